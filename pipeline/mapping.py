"""Mapping an uplink's decoded values onto a template's datastreams. Pure: no I/O, no clock.

The rules are Blynk's own (its TTS integration and Device HTTPS API), made explicit:

* A decoded key names a datastream by **name** (exact, then case-insensitive) or by **pin**
  (``v1``/``V1``); a template's ``mapping`` may redirect a key to a name or pin, with an optional
  ``scale`` and ``offset`` (``value * scale + offset``; an integer target is then rounded).
* **Booleans** become 1/0 (``"true"``/``"false"`` strings too, for numeric datastreams).
  **Numeric strings** become numbers where the datastream is numeric (Particle sends ``"20.00"``).
* **Types**: integer (int32; a float must be integral), double (finite), string (≤ 1024 bytes
  UTF-8; numbers are written as text), enum (an integer or an option label; an integer outside the
  options becomes the ``fallback``), location (``[lon, lat]``, or ``"lon,lat"``). A value that
  does not fit is *rejected* with reason ``type_mismatch``: the other keys of the uplink still go.
* Values that fit are **clamped** to the datastream's min/max, as Blynk does.
* **Location**: a ``[lon, lat]`` list, or a ``latitude``/``longitude`` (also ``lat``/``lng``,
  ``lat``/``lon``) key pair sharing a prefix (``gps_0.latitude`` + ``gps_0.longitude`` →
  ``gps_0``; bare ``latitude`` + ``longitude`` → ``location``), written to the datastream of
  that name, or to the template's only location datastream. Ingest hands a latitude/longitude
  object over as a ``[lon, lat]`` list under the object's key (CayenneLPP ``gps_0``, Particle
  ``coordinates``): when no datastream has that name, the first such list fills the template's
  only location datastream (unless a key filled it already). Ingest cannot tell such a list
  from any other two numbers, so an unmapped two-number list in range is taken as that
  location; give other pairs a datastream (or a ``mapping``) to keep them apart.
* Datastreams named ``RSSI`` and ``SNR`` are filled from the uplink's radio metadata (the best
  gateway) unless the payload set them itself.
* ``Blynk Firmware Version`` is the device's firmware version, never a datastream write.
* Particle's publish time (``PARTICLE_PUBLISHED_AT``, from ``device_meta["published_at"]``) is
  written when the template maps that key (the Blynk blueprint writes it to String ``V6``).
* Keys with no datastream are returned as ``unmapped`` so the caller counts and reports them.
* A template that declares no datastreams (e.g. the Particle blueprint with the token in the
  message) passes pin keys through untyped, leaving type checks to Blynk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.config import DatastreamConfig, DatastreamType, KeyMapping, TemplateConfig
from pipeline.errors import Reason
from pipeline.events import Uplink, Value

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
#: Blynk's limit on a string value (``limits.md``).
STRING_MAX_BYTES = 1024
FIRMWARE_KEY = "Blynk Firmware Version"
PUBLISHED_AT_KEY = "PARTICLE_PUBLISHED_AT"
RSSI = "RSSI"
SNR = "SNR"
#: Keys of the Particle blueprint's own envelope, never datastream values.
_PARTICLE_ENVELOPE = frozenset({"t"})
#: How many distinct decoded keys one template remembers the resolution of.
_RESOLVE_MEMO = 4096

_PIN = re.compile(r"[vV]([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])")
_SEPARATORS = "._-/ :"
#: (latitude word, longitude words) pairs recognised as a location.
_LAT_LON = (("latitude", ("longitude",)), ("lat", ("lng", "lon", "long")))


def pin_of(text: str) -> str | None:
    """``"v1"``/``"V1"`` → ``"V1"``; anything else → ``None``."""
    return f"V{text[1:]}" if _PIN.fullmatch(text) else None


class Mismatch(ValueError):
    """A value that does not fit its datastream's type (reason ``type_mismatch``)."""


@dataclass(frozen=True, slots=True)
class Datastream:
    name: str
    pin: str
    type: DatastreamType
    min: float | None = None
    max: float | None = None
    #: Enum options: label → integer value.
    options: Mapping[str, int] | None = None
    fallback: int | None = None
    history: bool = False

    @classmethod
    def from_config(cls, ds: DatastreamConfig) -> Datastream:
        return cls(
            name=ds.name,
            pin=ds.pin.upper(),
            type=ds.type,
            min=ds.min,
            max=ds.max,
            options=dict(ds.options) if ds.options is not None else None,
            fallback=ds.fallback,
            history=ds.history,
        )


class Target:
    """Where one decoded key lands: a pin, its datastream (``None`` = untyped), scale/offset,
    and ``convert``: the value check compiled for this target (raises :class:`Mismatch`)."""

    __slots__ = ("convert", "ds", "offset", "pin", "scale")

    def __init__(self, pin: str, ds: Datastream | None, scale: float | None = None,
                 offset: float | None = None) -> None:
        self.pin = pin
        self.ds = ds
        self.scale = scale
        self.offset = offset
        self.convert: Callable[[Value], Value] = _converter(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Target) and (self.pin, self.ds, self.scale, self.offset) == (
            other.pin, other.ds, other.scale, other.offset)

    def __hash__(self) -> int:
        return hash((self.pin, self.ds, self.scale, self.offset))

    def __repr__(self) -> str:
        return f"Target({self.pin!r}, {self.ds!r}, scale={self.scale}, offset={self.offset})"


@dataclass(slots=True)
class Rejected:
    key: str
    pin: str
    detail: str
    reason: Reason = Reason.TYPE_MISMATCH


@dataclass(slots=True)
class Mapped:
    """The result of mapping one uplink: pin → value, plus what could not be written."""

    pins: dict[str, Value] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    firmware: str | None = None


class Template:
    """A template compiled for mapping: lookups by name and pin, key resolutions memoized."""

    def __init__(
        self,
        name: str,
        datastreams: Iterable[Datastream] = (),
        mapping: Mapping[str, str | KeyMapping] | None = None,
        template_id: str | None = None,
    ) -> None:
        self.name = name
        self.id = template_id
        self.datastreams = tuple(datastreams)
        self.by_pin = {ds.pin: ds for ds in self.datastreams}
        self.by_name = {ds.name: ds for ds in self.datastreams}
        folded: dict[str, Datastream | None] = {}
        for ds in self.datastreams:
            # Two names differing only in case are ambiguous: neither matches case-insensitively.
            k = ds.name.casefold()
            folded[k] = None if k in folded else ds
        self._by_folded = folded
        self.untyped = not self.datastreams
        self.history_pins = frozenset(ds.pin for ds in self.datastreams if ds.history)
        locations = [ds for ds in self.datastreams if ds.type == "location"]
        self.location = locations[0] if len(locations) == 1 else None
        self.rssi = self.by_name.get(RSSI)
        self.snr = self.by_name.get(SNR)
        #: pin → the plain target of its datastream.
        self.targets = {ds.pin: Target(ds.pin, ds) for ds in self.datastreams}
        self._mapping: dict[str, Target | None] = {}
        for key, to in (mapping or {}).items():
            if isinstance(to, str):
                self._mapping[key] = self._lookup(to)
            else:
                t = self._lookup(to.to)
                self._mapping[key] = (
                    Target(t.pin, t.ds, to.scale, to.offset) if t is not None else None
                )
        self._memo: dict[str, Target | None] = {}
        self.published_at = self._mapping.get(PUBLISHED_AT_KEY) or self._mapping.get(
            "published_at"
        )

    @classmethod
    def from_config(
        cls, cfg: TemplateConfig, pulled: Sequence[DatastreamConfig] = ()
    ) -> Template:
        """Compile a configured template; declared datastreams override pulled ones by pin."""
        by_pin = {ds.pin.upper(): Datastream.from_config(ds) for ds in pulled}
        by_pin.update({ds.pin.upper(): Datastream.from_config(ds) for ds in cfg.datastreams})
        return cls(cfg.name, by_pin.values(), cfg.mapping, cfg.id)

    def _lookup(self, text: str) -> Target | None:
        """A datastream name or pin → target (no ``mapping`` involved)."""
        ds = self.by_name.get(text)
        if ds is None:
            ds = self._by_folded.get(text.casefold())
        if ds is not None:
            return Target(ds.pin, ds)
        pin = pin_of(text)
        if pin is None:
            return None
        ds = self.by_pin.get(pin)
        if ds is not None:
            return Target(pin, ds)
        return Target(pin, None) if self.untyped else None

    def resolve(self, key: str) -> Target | None:
        """Where a decoded key lands, or ``None`` when the template has no datastream for it."""
        try:
            return self._memo[key]
        except KeyError:
            pass
        target = self._mapping[key] if key in self._mapping else self._lookup(key)
        if target is None and key.casefold() == "location" and self.location is not None:
            target = Target(self.location.pin, self.location)
        if len(self._memo) < _RESOLVE_MEMO:
            self._memo[key] = target
        return target


def datastreams_from_platform(rows: Iterable[Mapping[str, Any]]) -> list[DatastreamConfig]:
    """Blynk Platform API ``template/datastreams`` rows → datastream configs (virtual pins only).

    A row looks like ``{"id":1,"label":"DS 1","alias":"DS 1","type":"INT","pin":1,
    "pinType":"VIRTUAL"}``, possibly with ``min``/``max``; rows of other pin types are skipped.
    """
    types: dict[str, DatastreamType] = {
        "INT": "integer", "INTEGER": "integer", "DOUBLE": "double", "FLOAT": "double",
        "STRING": "string", "ENUM": "enum", "LOCATION": "location",
    }
    out: list[DatastreamConfig] = []
    for row in rows:
        if str(row.get("pinType", "VIRTUAL")).upper() != "VIRTUAL" or row.get("pin") is None:
            continue
        kind = types.get(str(row.get("type", "DOUBLE")).upper(), "double")
        name = row.get("label") or row.get("alias") or row.get("name") or f"V{row['pin']}"
        mn, mx = row.get("min"), row.get("max")
        out.append(
            DatastreamConfig(
                name=str(name),
                pin=f"V{int(row['pin'])}",
                type=kind,
                min=float(mn) if isinstance(mn, int | float) else None,
                max=float(mx) if isinstance(mx, int | float) else None,
                id=int(row["id"]) if isinstance(row.get("id"), int) else None,
            )
        )
    return out


# ---- value coercion -------------------------------------------------------------------------


def _number(value: Value) -> int | float:
    """bool → 1/0, numbers as they are, numeric / boolean strings parsed; else Mismatch."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip()
        low = text.lower()
        if low in ("true", "false"):
            return int(low == "true")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise Mismatch(f"{value!r} is not a number") from None
    raise Mismatch(f"{_show(value)} is not a number")


def _clamp(v: float, ds: Datastream) -> float:
    if ds.min is not None and v < ds.min:
        return ds.min
    if ds.max is not None and v > ds.max:
        return ds.max
    return v


def _integer(ds: Datastream, value: Value, scaled: bool) -> Value:
    n = _number(value)
    if isinstance(n, float):
        if not math.isfinite(n):
            raise Mismatch(f"{_show(value)} is not an integer")
        if not n.is_integer():
            if not scaled:
                raise Mismatch(f"{_show(value)} is not an integer")
            n = round(n)
        n = int(n)
    if not INT32_MIN <= n <= INT32_MAX:
        raise Mismatch(f"{_show(value)} does not fit a 32-bit integer")
    return int(_clamp(n, ds))


def _double(ds: Datastream, value: Value, scaled: bool) -> Value:
    n = float(_number(value))
    if not math.isfinite(n):
        raise Mismatch(f"{_show(value)} is not a finite number")
    return float(_clamp(n, ds))


def _string(ds: Datastream, value: Value, scaled: bool) -> Value:
    if isinstance(value, bool):
        text = str(int(value))
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = repr(value) if isinstance(value, float) else str(value)
    else:
        raise Mismatch(f"{_show(value)} is not a string")
    if len(text.encode()) > STRING_MAX_BYTES:
        raise Mismatch(f"string of {len(text.encode())} bytes exceeds {STRING_MAX_BYTES}")
    return text


def _enum(ds: Datastream, value: Value, scaled: bool) -> Value:
    if ds.options is None:
        return _integer(ds, value, scaled)
    if isinstance(value, str) and value in ds.options:
        return ds.options[value]
    n = _integer(Datastream(ds.name, ds.pin, "integer"), value, scaled)
    assert isinstance(n, int)
    if n in ds.options.values():
        return n
    if ds.fallback is not None:
        return ds.fallback
    raise Mismatch(f"{_show(value)} is not an option and the datastream has no fallback")


def _location(ds: Datastream, value: Value, scaled: bool) -> Value:
    pair: list[float]
    if isinstance(value, list) and len(value) == 2:
        pair = [float(_number(v)) for v in value]
    elif isinstance(value, str) and value.count(",") == 1:
        pair = [float(_number(v)) for v in value.split(",")]
    else:
        raise Mismatch(f"{_show(value)} is not a [lon, lat] location")
    lon, lat = pair
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise Mismatch(f"{_show(value)} is not a [lon, lat] location (out of range)")
    return pair


_COERCE: dict[str, Callable[[Datastream, Value, bool], Value]] = {
    "integer": _integer,
    "double": _double,
    "string": _string,
    "enum": _enum,
    "location": _location,
}


def coerce(ds: Datastream, value: Value, scaled: bool = False) -> Value:
    """Check ``value`` against the datastream's type and clamp it; raises :class:`Mismatch`.

    ``scaled`` says a scale/offset was applied, which allows rounding into an integer.
    """
    if value is None:
        raise Mismatch("null value")
    try:
        return _COERCE[ds.type](ds, value, scaled)
    except (TypeError, OverflowError) as exc:  # e.g. a list element that is not a number
        raise Mismatch(f"{_show(value)}: {exc}") from None


def _untyped(value: Value) -> Value:
    """A value bound for a pin with no declared datastream: only booleans are changed."""
    if isinstance(value, bool):
        return int(value)
    if value is None:
        raise Mismatch("null value")
    return value


def _show(value: Value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_INF = math.inf


def _converter(target: Target) -> Callable[[Value], Value]:
    """The value check of one target, with fast paths for the common numeric cases (the hot
    path of transform: a plain int into an integer, a float into a double)."""
    ds = target.ds
    if target.scale is not None or target.offset is not None or ds is None:
        return lambda v: _apply(target, v)
    lo, hi = ds.min, ds.max
    if ds.type == "integer":
        ilo = None if lo is None else math.ceil(lo)
        ihi = None if hi is None else math.floor(hi)

        def integer(v: Value) -> Value:
            if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
                n = int(v)  # bool → 1/0; an integral float is an integer
                if INT32_MIN <= n <= INT32_MAX:
                    if ilo is not None and n < ilo:
                        return ilo
                    if ihi is not None and n > ihi:
                        return ihi
                    return n
            return _integer(ds, v, False)  # strings, fractions, overflow: raises or parses

        return integer
    if ds.type == "double":
        def double(v: Value) -> Value:
            if isinstance(v, int | float):
                f = float(v)  # bool → 1.0/0.0
                if f != f or f == _INF or f == -_INF:
                    raise Mismatch(f"{_show(v)} is not a finite number")
                if lo is not None and f < lo:
                    return lo
                if hi is not None and f > hi:
                    return hi
                return f
            return _double(ds, v, False)

        return double
    return lambda v: coerce(ds, v)


def _apply(target: Target, value: Value) -> Value:
    if target.scale is not None or target.offset is not None:
        n = _number(value)
        value = n * (target.scale if target.scale is not None else 1) + (target.offset or 0)
        scaled = True
    else:
        scaled = False
    if target.ds is None:
        return _untyped(value)
    return coerce(target.ds, value, scaled)


# ---- the whole uplink -----------------------------------------------------------------------


def _location_pairs(
    template: Template, values: Mapping[str, Value]
) -> list[tuple[str, str, str]]:
    """``(combined key, lat key, lon key)`` for each latitude/longitude pair in ``values``.

    A pair is combined only if its latitude key does not itself resolve to a (non-location)
    datastream: a template with separate latitude and longitude datastreams keeps them apart.
    """
    lowered = {k.lower(): k for k in values}
    pairs: list[tuple[str, str, str]] = []
    for low, key in lowered.items():
        for lat_word, lon_words in _LAT_LON:
            if not low.endswith(lat_word):
                continue
            base = low[: -len(lat_word)]
            if base and base[-1] not in _SEPARATORS:
                continue
            lon_key = next((lowered[base + w] for w in lon_words if base + w in lowered), None)
            if lon_key is None:
                continue
            own = template.resolve(key)
            if own is not None and (own.ds is None or own.ds.type != "location"):
                continue
            combined = key[: len(base)].rstrip(_SEPARATORS) or "location"
            pairs.append((combined, key, lon_key))
            break
    return pairs


def published_at_text(uplink: Uplink) -> str:
    """Particle's publish time as Particle writes it (ISO 8601, ms, ``Z``)."""
    text = uplink.device_meta.get("published_at")
    if text:
        return text
    ts = datetime.fromtimestamp(uplink.event_ts_ms / 1000, tz=UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def maps_a_value(template: Template, uplink: Uplink) -> bool:
    """Whether at least one decoded value of the uplink lands on a datastream (radio metadata
    and Particle's publish time do not count: every uplink has those)."""
    return bool(map_uplink(template, uplink, extras=False).pins)


def map_uplink(template: Template, uplink: Uplink, *, extras: bool = True) -> Mapped:
    """Map one uplink's values (and, with ``extras``, its radio metadata and Particle publish
    time) onto the template's pins. Never raises."""
    out = Mapped()
    values = uplink.values
    pins = out.pins
    unmapped = out.unmapped
    resolve = template.resolve
    token = uplink.token
    for key, value in values.items():
        target = resolve(key)
        if target is None:
            if key == FIRMWARE_KEY:
                out.firmware = None if value is None else str(value)
            elif token is None or key not in _PARTICLE_ENVELOPE:
                unmapped.append(key)
            continue
        try:
            pins[target.pin] = target.convert(value)
        except Mismatch as exc:
            out.rejected.append(_rejected(key, target, exc))
    if unmapped and any("lat" in k.lower() for k in unmapped):
        _map_pairs(out, template, values)
    loc = template.location
    if unmapped and loc is not None and loc.pin not in pins:
        _map_location_list(out, template.targets[loc.pin], values)
    if not extras:
        return out
    radio = uplink.radio
    if radio is not None:
        for ds, v in ((template.rssi, radio.rssi), (template.snr, radio.snr)):
            if ds is not None and v is not None and ds.pin not in pins:
                try:
                    # Radio values are measurements: rounded into an integer datastream.
                    pins[ds.pin] = template.targets[ds.pin].convert(
                        round(v) if ds.type == "integer" else v)
                except Mismatch as exc:
                    out.rejected.append(Rejected(ds.name, ds.pin, str(exc)))
    target = template.published_at
    if target is not None and uplink.source == "particle" and target.pin not in pins:
        try:
            pins[target.pin] = _apply(target, published_at_text(uplink))
        except Mismatch as exc:
            out.rejected.append(Rejected(PUBLISHED_AT_KEY, target.pin, str(exc)))
    return out


def _map_pairs(out: Mapped, template: Template, values: Mapping[str, Value]) -> None:
    """Combine unmapped latitude/longitude key pairs into locations (see the module doc)."""
    loose = {k: values[k] for k in out.unmapped}
    pairs = _location_pairs(template, loose)
    if not pairs:
        return
    used: set[str] = set()
    for combined, lat_key, lon_key in pairs:
        pair: Value = [loose[lon_key], loose[lat_key]]  # type: ignore[list-item]
        target = template.resolve(combined)
        if target is None and template.location is not None:
            target = template.resolve("location")  # the template's only location datastream
        if target is None:
            continue
        used.update((lat_key, lon_key))
        try:
            out.pins[target.pin] = target.convert(pair)
        except Mismatch as exc:
            out.rejected.append(_rejected(combined, target, exc))
    out.unmapped[:] = [k for k in out.unmapped if k not in used]


def _map_location_list(out: Mapped, target: Target, values: Mapping[str, Value]) -> None:
    """The first unmapped ``[lon, lat]`` pair — how ingest hands over a latitude/longitude
    object under its own key (:func:`pipeline.values.flatten`) — fills the template's only
    location datastream when nothing else did. A pair out of range is no location: it stays
    unmapped rather than rejected."""
    for key in out.unmapped:
        value = values[key]
        if isinstance(value, list) and len(value) == 2:
            try:
                out.pins[target.pin] = target.convert(value)
            except Mismatch:
                continue
            out.unmapped.remove(key)
            return


def _rejected(key: str, target: Target, exc: Mismatch) -> Rejected:
    kind = target.ds.type if target.ds is not None else "untyped"
    return Rejected(key, target.pin, f"{exc} (datastream {kind})")


def describe_rejected(rejected: Sequence[Rejected]) -> str:
    """One line naming every rejected key, for a dead letter's detail."""
    return "; ".join(f"key {r.key!r} → {r.pin}: {r.detail}" for r in rejected)
