"""The emulated Blynk organization: templates, devices, datastream values, and the rules for values.

Pure data and pure functions; no sockets and no clock reads except the ``now_ms`` passed in. The
file format (YAML) is described by the ``*Spec`` Structs; :class:`Model` is the live, mutable
state built from them (and changed by the platform API, the device API and tests).

Value rules follow ``shared/reference/blynk-api.md`` section 5: a value must parse as the
datastream type or it is rejected (:class:`Mismatch`); values that parse are clamped to min/max;
an enum value outside its options becomes the fallback.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal

import msgspec

DatastreamType = Literal["integer", "double", "string", "enum", "location"]
#: Who wrote a value: the device HTTPS API (``device``), a dashboard or app user (``app``, the
#: emulator's ``app-write`` admin call), or the platform API (``platform``).
Origin = Literal["device", "app", "platform"]
#: A stored datastream value: int, float, str, or ``[lon, lat]``.
Value = int | float | str | list[float]

INT32_MIN, INT32_MAX = -2_147_483_648, 2_147_483_647

# --------------------------------------------------------------------------------------------
# File format
# --------------------------------------------------------------------------------------------


class _Spec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


class DatastreamSpec(_Spec):
    id: int
    pin: str
    name: str
    type: DatastreamType = "double"
    alias: str | None = None
    units: str | None = None
    min: float | None = None
    max: float | None = None
    #: Enum: value → label. Values outside fall back to ``fallback``.
    options: dict[int, str] | None = None
    fallback: int | None = None
    #: Returned by reads before any write.
    default: Any = None


class MetafieldSpec(_Spec):
    id: int
    name: str
    type: str = "Text"
    default: str = ""


class TemplateSpec(_Spec):
    id: str
    name: str
    datastreams: list[DatastreamSpec] = msgspec.field(default_factory=list)
    metafields: list[MetafieldSpec] = msgspec.field(default_factory=list)
    #: Event codes accepted by ``logEvent``.
    events: list[str] = msgspec.field(default_factory=list)
    #: Internal integer id (platform API responses); assigned when absent.
    num: int | None = None


class DeviceSpec(_Spec):
    name: str
    token: str
    template: str
    id: int | None = None
    region: str | None = None
    #: Metafield name → value.
    metafields: dict[str, str] = msgspec.field(default_factory=dict)
    #: Pin → initial value.
    values: dict[str, Any] = msgspec.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Pins
# --------------------------------------------------------------------------------------------


def _pin_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for kind, top in (("V", 255), ("A", 31), ("D", 63)):
        for n in range(top + 1):
            canon = f"{kind}{n}"
            table[canon] = canon
            table[canon.lower()] = canon
    return table


#: Every accepted pin spelling (``v1``, ``V1``, ``a0``…) → canonical upper-case form. A dict
#: lookup instead of parsing keeps the request hot path free of regexes.
PINS: dict[str, str] = _pin_table()


def is_id(text: str) -> bool:
    """Only ASCII digits (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def canonical_pin(text: str) -> str | None:
    """``v1``/``V1`` → ``V1``; anything that is not a pin → None."""
    return PINS.get(text)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


class Mismatch(ValueError):
    """The value does not parse as the datastream's type (HTTP 400 over the device API)."""


class Datastream:
    """One datastream of a template, with its value rules."""

    __slots__ = ("alias", "default", "fallback", "id", "max", "min", "name", "options", "pin",
                 "type", "units")

    def __init__(self, spec: DatastreamSpec) -> None:
        pin = canonical_pin(spec.pin)
        if pin is None:
            raise ValueError(f"datastream {spec.name!r}: bad pin {spec.pin!r}")
        self.id = spec.id
        self.pin = pin
        self.name = spec.name
        self.alias = spec.alias or spec.name
        self.type: DatastreamType = spec.type
        self.units = spec.units
        self.min = spec.min
        self.max = spec.max
        self.options = spec.options
        self.fallback = spec.fallback
        self.default: Value | None = None
        if spec.default is not None:
            self.default = self.coerce_json(spec.default)

    def spec(self) -> DatastreamSpec:
        return DatastreamSpec(id=self.id, pin=self.pin, name=self.name, type=self.type,
                              alias=self.alias, units=self.units, min=self.min, max=self.max,
                              options=self.options, fallback=self.fallback, default=self.default)

    def _clamp(self, v: float) -> float:
        if self.min is not None and v < self.min:
            return self.min
        if self.max is not None and v > self.max:
            return self.max
        return v

    def coerce_text(self, text: str, *, decimal_integers: bool = False,
                    string_max: int = 1024) -> Value:
        """Parse a query-string value. ``lon,lat`` for locations. Raises :class:`Mismatch`."""
        t = self.type
        if t == "double":
            try:
                f = float(text)
            except ValueError:
                raise Mismatch(text) from None
            if not math.isfinite(f):
                raise Mismatch(text)
            return self._clamp(f)
        if t == "integer" or t == "enum":
            try:
                i = int(text)
            except ValueError:
                if not decimal_integers:
                    raise Mismatch(text) from None
                try:
                    f = float(text)
                except ValueError:
                    raise Mismatch(text) from None
                if not f.is_integer():
                    raise Mismatch(text) from None
                i = int(f)
            return self._int(i)
        if t == "string":
            if len(text.encode()) > string_max:
                raise Mismatch("string too long")
            return text
        parts = text.split(",")
        if len(parts) != 2:
            raise Mismatch(text)
        return self.location(parts[0], parts[1])

    def _int(self, i: int) -> int:
        if i < INT32_MIN or i > INT32_MAX:
            raise Mismatch(str(i))
        if self.type == "enum":
            if self.options is not None and i not in self.options:
                return self.fallback if self.fallback is not None else i
            return i
        return int(self._clamp(i))

    def location(self, lon: str | float, lat: str | float) -> list[float]:
        try:
            pair = [float(lon), float(lat)]
        except (TypeError, ValueError):
            raise Mismatch(f"{lon},{lat}") from None
        if not (math.isfinite(pair[0]) and math.isfinite(pair[1])):
            raise Mismatch(f"{lon},{lat}")
        return pair

    def coerce_json(self, v: Any, *, string_max: int = 1024) -> Value:
        """Check a JSON value (timestamped upload, platform API). Booleans are 1/0."""
        if isinstance(v, bool):
            v = int(v)
        t = self.type
        if t == "location":
            if isinstance(v, list) and len(v) == 2:
                return self.location(v[0], v[1])
            if isinstance(v, str):
                return self.coerce_text(v)
            raise Mismatch(repr(v))
        if t == "string":
            if isinstance(v, (int, float)):
                v = str(v)
            if not isinstance(v, str):
                raise Mismatch(repr(v))
            return self.coerce_text(v, string_max=string_max)
        if isinstance(v, str):
            return self.coerce_text(v)
        if t == "double":
            if isinstance(v, (int, float)) and math.isfinite(v):
                return self._clamp(float(v))
            raise Mismatch(repr(v))
        if isinstance(v, int):
            return self._int(v)
        if isinstance(v, float) and v.is_integer():
            return self._int(int(v))
        raise Mismatch(repr(v))

    def platform_type(self) -> str:
        return {"integer": "INT", "double": "DOUBLE", "string": "STRING", "enum": "ENUM",
                "location": "LOCATION"}[self.type]


def format_value(v: Value, double_format: str | None = None) -> str:
    """The raw text body of a one-pin ``get``."""
    if isinstance(v, float):
        return double_format.format(v) if double_format else repr(v)
    if isinstance(v, list):
        return msgspec.json.encode(v).decode()
    return str(v)


# --------------------------------------------------------------------------------------------
# Live model
# --------------------------------------------------------------------------------------------


class Template:
    __slots__ = ("by_id", "by_pin", "datastreams", "events", "id", "metafields", "name", "num")

    def __init__(self, spec: TemplateSpec, num: int) -> None:
        self.id = spec.id
        self.name = spec.name
        self.num = spec.num if spec.num is not None else num
        self.datastreams = [Datastream(d) for d in spec.datastreams]
        self.by_pin = {d.pin: d for d in self.datastreams}
        self.by_id = {d.id: d for d in self.datastreams}
        if len(self.by_pin) != len(self.datastreams) or len(self.by_id) != len(self.datastreams):
            raise ValueError(f"template {spec.id}: duplicate datastream pin or id")
        self.metafields = list(spec.metafields)
        self.events = set(spec.events)

    def metafield(self, name_or_id: str | int) -> MetafieldSpec | None:
        for m in self.metafields:
            if m.id == name_or_id or m.name == name_or_id:
                return m
        return None

    def spec(self) -> TemplateSpec:
        return TemplateSpec(id=self.id, name=self.name, num=self.num,
                            datastreams=[d.spec() for d in self.datastreams],
                            metafields=list(self.metafields), events=sorted(self.events))


class Device:
    """A device and its live state: current values, history, counters, rate bucket."""

    __slots__ = ("activated_at", "bucket", "bucket_ts", "day", "events", "events_today", "history",
                 "id", "imports_today", "last_data_ms", "last_write_ms", "last_write_origin",
                 "messages", "metafields", "name", "origins", "properties", "region", "template",
                 "token", "updates_today", "values")

    def __init__(self, id: int, name: str, token: str, template: Template, region: str,
                 now_ms: int) -> None:
        self.id = id
        self.name = name
        self.token = token
        self.template = template
        self.region = region
        self.activated_at = now_ms
        #: Metafield id → value.
        self.metafields: dict[int, str] = {m.id: m.default for m in template.metafields}
        #: Pin → (value, timestamp ms).
        self.values: dict[str, tuple[Value, int]] = {}
        self.history: dict[str, deque[tuple[int, Value]]] = {}
        #: Pin → origin of its current value; and the time and origin of the device's last write,
        #: so a test can tell a dashboard write from the bridge's device-API write.
        self.origins: dict[str, Origin] = {}
        self.last_write_ms = 0
        self.last_write_origin: Origin | None = None
        #: Pin → widget property → value (``update/property``).
        self.properties: dict[str, dict[str, str]] = {}
        #: logEvent calls: (ts ms, code, description).
        self.events: deque[tuple[int, str, str]] = deque(maxlen=1000)
        self.messages = 0
        self.day = 0
        self.updates_today = 0
        self.imports_today = 0
        self.events_today = 0
        self.last_data_ms = 0
        self.bucket = 0.0
        self.bucket_ts = 0.0

    def value(self, pin: str) -> Value | None:
        got = self.values.get(pin)
        if got is not None:
            return got[0]
        ds = self.template.by_pin.get(pin)
        return ds.default if ds is not None else None


def new_token() -> str:
    """32 URL-safe characters: 24 random bytes in base64, like Blynk's tokens."""
    return secrets.token_urlsafe(24)


#: Called after every datastream update: (device, datastream, value, ts_ms).
UpdateListener = Callable[["Device", Datastream, Value, int], None]


class Model:
    """Templates and devices of one organization; every datastream write goes through here."""

    def __init__(self, *, history_len: int = 1000, default_region: str = "default") -> None:
        self.templates: dict[str, Template] = {}
        self.templates_by_num: dict[int, Template] = {}
        self.devices: dict[int, Device] = {}
        self.by_token: dict[str, Device] = {}
        self.history_len = history_len
        self.default_region = default_region
        self.listeners: list[UpdateListener] = []
        self._next_device = 1

    # templates and devices -------------------------------------------------------------------
    def add_template(self, spec: TemplateSpec) -> Template:
        if spec.id in self.templates:
            raise ValueError(f"template {spec.id} defined twice")
        t = Template(spec, num=len(self.templates) + 1)
        self.templates[t.id] = t
        self.templates_by_num[t.num] = t
        return t

    def template(self, ref: str | int) -> Template | None:
        """By ``TMPL…`` id or internal number (also as text)."""
        if isinstance(ref, str):
            t = self.templates.get(ref)
            if t is not None:
                return t
            if not is_id(ref):
                return None
            ref = int(ref)
        return self.templates_by_num.get(ref)

    def add_device(self, template: str, name: str, *, token: str | None = None,
                   id: int | None = None, region: str | None = None,
                   metafields: dict[str, str] | None = None, now_ms: int = 0) -> Device:
        t = self.template(template)
        if t is None:
            raise KeyError(template)
        token = token or new_token()
        if token in self.by_token:
            raise ValueError("duplicate device token")
        if id is None:
            id = self._next_device
        if id in self.devices:
            raise ValueError(f"duplicate device id {id}")
        self._next_device = max(self._next_device, id + 1)
        d = Device(id, name, token, t, region or self.default_region, now_ms)
        for mname, mval in (metafields or {}).items():
            m = t.metafield(mname)
            if m is None:
                raise ValueError(f"device {name!r}: template {t.id} has no metafield {mname!r}")
            d.metafields[m.id] = mval
        self.devices[id] = d
        self.by_token[token] = d
        return d

    def add_device_spec(self, spec: DeviceSpec, now_ms: int = 0) -> Device:
        d = self.add_device(spec.template, spec.name, token=spec.token, id=spec.id,
                            region=spec.region, metafields=spec.metafields, now_ms=now_ms)
        for pin, raw in spec.values.items():
            canon = canonical_pin(pin)
            ds = d.template.by_pin.get(canon) if canon else None
            if ds is None:
                raise ValueError(f"device {spec.name!r}: no datastream on pin {pin!r}")
            self.write(d, ds, ds.coerce_json(raw), now_ms, notify=False)
        return d

    # values -----------------------------------------------------------------------------------
    def write(self, device: Device, ds: Datastream, value: Value, ts_ms: int, *,
              current: bool = True, notify: bool = True, origin: Origin = "device") -> None:
        """Record one datastream value (current value unless ``current=False``) and its history."""
        if current:
            prev = device.values.get(ds.pin)
            if prev is None or prev[1] <= ts_ms:
                device.values[ds.pin] = (value, ts_ms)
                device.origins[ds.pin] = origin
            device.last_write_ms = ts_ms
            device.last_write_origin = origin
        hist = device.history.get(ds.pin)
        if hist is None:
            hist = device.history[ds.pin] = deque(maxlen=self.history_len)
        hist.append((ts_ms, value))
        if notify and self.listeners:
            for listener in self.listeners:
                listener(device, ds, value, ts_ms)

    def write_current(self, device: Device, values: Iterable[tuple[Datastream, Value]],
                      ts_ms: int, origin: Origin = "device") -> None:
        """:meth:`write` of each (datastream, value) in order, all at ``ts_ms``, as current
        values, notifying: the device API's one message, in one call instead of one per pin."""
        current = device.values
        origins = device.origins
        device.last_write_ms = ts_ms
        device.last_write_origin = origin
        history = device.history
        listeners = self.listeners
        for ds, value in values:
            pin = ds.pin
            prev = current.get(pin)
            if prev is None or prev[1] <= ts_ms:
                current[pin] = (value, ts_ms)
                origins[pin] = origin
            hist = history.get(pin)
            if hist is None:
                hist = history[pin] = deque(maxlen=self.history_len)
            hist.append((ts_ms, value))
            if listeners:
                for listener in listeners:
                    listener(device, ds, value, ts_ms)

    def reset_values(self) -> None:
        for d in self.devices.values():
            d.values.clear()
            d.origins.clear()
            d.last_write_ms = 0
            d.last_write_origin = None
            d.history.clear()
            d.properties.clear()
            d.events.clear()
            d.messages = d.updates_today = d.imports_today = d.events_today = 0
            d.last_data_ms = 0
            d.bucket = 0.0

    def search(self, query: str, *, metafields: bool) -> list[Device]:
        q = query.lower()
        out = []
        for d in self.devices.values():
            if q in d.name.lower() or (metafields and any(q in v.lower()
                                                         for v in d.metafields.values())):
                out.append(d)
        return out


def iter_specs(model: Model) -> Iterable[TemplateSpec]:
    return (t.spec() for t in model.templates.values())
