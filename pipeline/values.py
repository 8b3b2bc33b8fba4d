"""Decoded JSON objects → flat ``Uplink.values`` (pure; shared by ``pipeline.tts`` and
``pipeline.particle``).

:func:`flatten` applies these rules, in this order, to each key of an object:

* **Scalars** (string, float, bool, ``null``) are kept as sent. **Integers** are kept when
  msgpack can carry them (``-2**63`` … ``2**64 - 1``); beyond that they become floats, and
  beyond a float's range their decimal text (the stream is msgpack: an integer it cannot carry
  would fail every later stage).
* **Nested objects** become dotted keys: ``{"a": {"b": 1}}`` → ``a.b``.
* **Location objects**: an object holding ``lat`` + ``lng``/``lon``, or ``latitude`` +
  ``longitude``, becomes ``[lon, lat]`` (floats, Blynk's order) under its own key; its other
  keys are dotted as usual (``pos.alt``). Coordinates must be numbers within ±90 (lat) and ±180
  (lon); with ``coerce_coordinates`` numeric strings (``"39.7"``) count too. A pair that does not
  qualify is **not an error**: the object simply stays plain dotted keys (``pos.lat``,
  ``pos.lng``), so one odd key never costs the rest of a message. With ``top_location`` set, a
  pair at the top level of ``obj`` becomes that key (Particle: ``location``).
* **A list of exactly two numbers** stays a list of two floats (it may be a location already);
  other **lists** become ``key.0``, ``key.1``… (Particle's own mustache path syntax).

Limits, each an :class:`~pipeline.errors.InvalidInput` naming the field (prefixed by ``where``):
nesting deeper than ``max_depth`` → ``wrong_shape``; more than ``max_values`` values →
``too_many_values``; anything that is not a JSON type → ``wrong_shape``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from pipeline.errors import InvalidInput, Reason
from pipeline.events import Value

#: Nesting deeper than this is refused (``wrong_shape``).
MAX_DEPTH = 16
#: More values than this from one message are refused (``too_many_values``).
MAX_VALUES = 512
#: What msgpack carries: int64 and uint64.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1

#: Latitude key → the longitude keys it pairs with, in order of preference.
_PAIRS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lat", ("lng", "lon")),
    ("latitude", ("longitude",)),
)
_LAT_LIMIT, _LON_LIMIT = 90.0, 180.0


class _Rules(NamedTuple):
    where: str
    coerce: bool
    max_values: int
    max_depth: int


def flatten(
    obj: Mapping[str, Any],
    *,
    where: str = "",
    top_location: str | None = None,
    coerce_coordinates: bool = False,
    max_values: int = MAX_VALUES,
    max_depth: int = MAX_DEPTH,
) -> dict[str, Value]:
    """Flatten one decoded JSON object by the module's rules.

    ``where`` prefixes the ``field`` of errors (``data.``, ``uplink_message.decoded_payload.``).
    Raises :class:`~pipeline.errors.InvalidInput` (``wrong_shape``, ``too_many_values``).
    """
    rules = _Rules(where, coerce_coordinates, max_values, max_depth)
    out: dict[str, Value] = {}
    if top_location is not None and ("lat" in obj or "latitude" in obj):
        found = location_of(obj, coerce=coerce_coordinates)
        if found is not None:
            out[top_location], lat_key, lon_key = found
            obj = {k: v for k, v in obj.items() if k != lat_key and k != lon_key}
    _walk(obj, "", out, 0, rules)
    return out


def location_of(
    obj: Mapping[str, Any], *, coerce: bool = False
) -> tuple[list[float], str, str] | None:
    """``([lon, lat], lat_key, lon_key)`` when ``obj`` holds a valid coordinate pair, else
    ``None`` (no pair, or coordinates that are not numbers in range)."""
    for lat_key, lon_keys in _PAIRS:
        if lat_key not in obj:
            continue
        for lon_key in lon_keys:
            if lon_key not in obj:
                continue
            lat = _coordinate(obj[lat_key], _LAT_LIMIT, coerce)
            lon = _coordinate(obj[lon_key], _LON_LIMIT, coerce)
            if lat is not None and lon is not None:
                return [lon, lat], lat_key, lon_key
    return None


def scalar(value: Any, field: str) -> Value:
    """One plain JSON value as a ``Value`` (integers by the module's rule); a container or a
    non-JSON type is ``wrong_shape`` naming ``field``."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return value if INT_MIN <= value <= INT_MAX else _big_int(value)
    raise InvalidInput("expected a plain value", reason=Reason.WRONG_SHAPE, field=field)


def _walk(
    obj: Mapping[str, Any], prefix: str, out: dict[str, Value], depth: int, rules: _Rules
) -> None:
    if depth > rules.max_depth:
        raise InvalidInput(
            f"nested deeper than {rules.max_depth}",
            reason=Reason.WRONG_SHAPE,
            field=rules.where + prefix[:-1],
        )
    for key, value in obj.items():
        name = prefix + key
        # Exact type checks: the hot path of both ingests (bench/ingest_*).
        kind = type(value)
        if kind is str or kind is float or kind is bool or value is None:
            out[name] = value
        elif kind is int:
            out[name] = value if INT_MIN <= value <= INT_MAX else _big_int(value)
        elif kind is dict:
            if "lat" in value or "latitude" in value:
                found = location_of(value, coerce=rules.coerce)
                if found is not None:
                    out[name], lat_key, lon_key = found
                    value = {k: v for k, v in value.items() if k != lat_key and k != lon_key}
            _walk(value, name + ".", out, depth + 1, rules)
        elif kind is list:
            pair = _number_pair(value) if len(value) == 2 else None
            if pair is not None:
                out[name] = pair
            else:
                if len(value) > rules.max_values:
                    raise _too_many(rules, name)
                _walk({str(i): v for i, v in enumerate(value)}, name + ".", out, depth + 1,
                      rules)
        else:
            out[name] = scalar(value, rules.where + name)
    if len(out) > rules.max_values:
        raise _too_many(rules, prefix[:-1])


def _too_many(rules: _Rules, name: str) -> InvalidInput:
    return InvalidInput(
        f"more than {rules.max_values} values in one message",
        reason=Reason.TOO_MANY_VALUES,
        field=rules.where + name if name else (rules.where[:-1] or "$"),
    )


def _number_pair(items: list[Any]) -> list[float] | None:
    a, b = items
    if type(a) not in (int, float) or type(b) not in (int, float):
        return None
    try:
        return [float(a), float(b)]
    except OverflowError:  # an integer beyond a float: not a pair of numbers we can carry
        return None


def _big_int(value: int) -> float | str:
    try:
        return float(value)
    except OverflowError:
        return str(value)


def _coordinate(value: Any, limit: float, coerce: bool) -> float | None:
    kind = type(value)
    number: float
    if kind is int:
        if not -limit <= value <= limit:
            return None
        return float(value)
    if kind is float:
        number = value
    elif kind is str and coerce:
        text = value.strip()
        if not text or len(text) > 64:
            return None
        try:
            number = float(text)
        except ValueError:
            return None
    else:  # bool, null, containers; strings unless coerced
        return None
    # NaN fails both comparisons; infinities are out of range.
    return number if -limit <= number <= limit else None
