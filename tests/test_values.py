"""Table tests of the one flattener both parsers use (``pipeline.values``)."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from pipeline.errors import InvalidInput
from pipeline.values import INT_MAX, INT_MIN, MAX_DEPTH, MAX_VALUES, flatten, location_of, scalar

BIG = int("1" + "0" * 400)

# (name, object, keyword arguments, expected values)
ROWS: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ("scalars as sent", {"s": "x", "f": 1.5, "b": True, "n": None, "i": 3}, {},
     {"s": "x", "f": 1.5, "b": True, "n": None, "i": 3}),
    ("nested → dotted", {"a": {"b": {"c": 1}}, "d": {}}, {}, {"a.b.c": 1}),
    ("odd keys kept", {"Battery(%)": 90, "": 1, "a.b": 2}, {}, {"Battery(%)": 90, "": 1, "a.b": 2}),
    ("int64/uint64 bounds", {"lo": INT_MIN, "hi": INT_MAX}, {}, {"lo": INT_MIN, "hi": INT_MAX}),
    ("beyond msgpack → float", {"lo": INT_MIN - 1, "hi": INT_MAX + 1}, {},
     {"lo": float(INT_MIN - 1), "hi": float(INT_MAX + 1)}),
    ("beyond a float → text", {"x": BIG, "y": -BIG}, {}, {"x": str(BIG), "y": str(-BIG)}),
    ("two numbers stay a list", {"p": [1, 2.5]}, {}, {"p": [1.0, 2.5]}),
    ("two bools are a list of values", {"p": [True, False]}, {}, {"p.0": True, "p.1": False}),
    ("a pair with a huge int is a list of values", {"p": [BIG, 1]}, {},
     {"p.0": str(BIG), "p.1": 1}),
    ("other lists → key.N", {"l": [1, "a", {"b": None}, [3]]}, {},
     {"l.0": 1, "l.1": "a", "l.2.b": None, "l.3.0": 3}),
    ("empty list → nothing", {"l": []}, {}, {}),
    ("lat/lng object", {"pos": {"lat": 10, "lng": 20, "alt": 3}}, {},
     {"pos": [20.0, 10.0], "pos.alt": 3}),
    ("lat/lon object", {"pos": {"lat": -10.5, "lon": -20}}, {}, {"pos": [-20.0, -10.5]}),
    ("latitude/longitude object", {"gps_0": {"latitude": 52.3, "longitude": 4.9}}, {},
     {"gps_0": [4.9, 52.3]}),
    ("lng preferred over lon; the other stays",
     {"p": {"lat": 1, "lng": 2, "lon": 3}}, {}, {"p": [2.0, 1.0], "p.lon": 3}),
    ("lat with longitude is no pair", {"p": {"lat": 1, "longitude": 2}}, {},
     {"p.lat": 1, "p.longitude": 2}),
    ("a bad lat/lng pair falls back to latitude/longitude",
     {"p": {"lat": "x", "lng": 1, "latitude": 5, "longitude": 6}}, {},
     {"p": [6.0, 5.0], "p.lat": "x", "p.lng": 1}),
    ("edges of the range", {"p": {"lat": 90, "lng": -180}}, {}, {"p": [-180.0, 90.0]}),
    ("lat out of range → plain", {"p": {"lat": 90.5, "lng": 1}}, {}, {"p.lat": 90.5, "p.lng": 1}),
    ("lng out of range → plain", {"p": {"lat": 1, "lng": 181}}, {}, {"p.lat": 1, "p.lng": 181}),
    ("huge coordinate → plain", {"p": {"lat": BIG, "lng": 1}}, {},
     {"p.lat": str(BIG), "p.lng": 1}),
    ("bool coordinate → plain", {"p": {"lat": True, "lng": 1}}, {},
     {"p.lat": True, "p.lng": 1}),
    ("null coordinate → plain", {"p": {"lat": None, "lng": 1}}, {},
     {"p.lat": None, "p.lng": 1}),
    ("string coordinates, not coerced → plain", {"p": {"lat": "1.5", "lng": "2"}}, {},
     {"p.lat": "1.5", "p.lng": "2"}),
    ("string coordinates, coerced", {"p": {"lat": " 1.5", "lng": "2"}},
     {"coerce_coordinates": True}, {"p": [2.0, 1.5]}),
    ("coerced but not numbers → plain", {"p": {"lat": "north", "lng": "nan"}},
     {"coerce_coordinates": True}, {"p.lat": "north", "p.lng": "nan"}),
    ("coerced but out of range → plain", {"p": {"lat": "inf", "lng": "1"}},
     {"coerce_coordinates": True}, {"p.lat": "inf", "p.lng": "1"}),
    ("top-level pair without top_location → plain", {"lat": 1, "lng": 2}, {},
     {"lat": 1, "lng": 2}),
    ("top-level pair with top_location", {"lat": 1, "lng": 2, "t": 3},
     {"top_location": "location"}, {"location": [2.0, 1.0], "t": 3}),
    ("top-level bad pair with top_location → plain", {"lat": 91, "lng": 2},
     {"top_location": "location"}, {"lat": 91, "lng": 2}),
    ("nested pair with top_location keeps its key", {"c": {"lat": 1, "lng": 2}},
     {"top_location": "location"}, {"c": [2.0, 1.0]}),
]


@pytest.mark.parametrize(("obj", "kwargs", "want"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_flatten(obj: dict[str, Any], kwargs: dict[str, Any], want: dict[str, Any]) -> None:
    got = flatten(obj, **kwargs)
    assert got == want
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()]
    msgspec.msgpack.encode(got)  # everything it returns fits the stream


def test_nan_is_not_a_coordinate() -> None:
    got = flatten({"p": {"lat": math.nan, "lng": 1}})
    assert set(got) == {"p.lat", "p.lng"}


# (name, object, keyword arguments, reason, field)
ERRORS: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    ("too deep", {"a": {"v": 1}}, {"max_depth": 0}, "wrong_shape", "a"),
    ("too deep, field prefixed", {"a": {"b": {"c": 1}}}, {"max_depth": 1, "where": "data."},
     "wrong_shape", "data.a.b"),
    ("too many values", {str(i): i for i in range(5)}, {"max_values": 4}, "too_many_values",
     "$"),
    ("too many values, prefixed", {str(i): i for i in range(5)},
     {"max_values": 4, "where": "data."}, "too_many_values", "data"),
    ("a long list is refused before it is walked", {"l": list(range(10))}, {"max_values": 4},
     "too_many_values", "l"),
    ("too many nested values: where the limit was crossed",
     {"a": {"b": [1, 2, 3], "c": [4, 5, 6]}}, {"max_values": 5}, "too_many_values", "a.c"),
    ("not a JSON type", {"a": {"b": b"bytes"}}, {"where": "x."}, "wrong_shape", "x.a.b"),
]


@pytest.mark.parametrize(("obj", "kwargs", "reason", "field"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_flatten_refuses(obj: dict[str, Any], kwargs: dict[str, Any], reason: str,
                         field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        flatten(obj, **kwargs)
    assert (err.value.reason, err.value.field) == (reason, field)


def test_default_limits() -> None:
    deep: dict[str, Any] = {"v": 1}
    for _ in range(MAX_DEPTH):
        deep = {"a": deep}
    assert len(flatten(deep)) == 1
    with pytest.raises(InvalidInput):
        flatten({"a": deep})
    assert len(flatten({str(i): i for i in range(MAX_VALUES)})) == MAX_VALUES
    with pytest.raises(InvalidInput):
        flatten({str(i): i for i in range(MAX_VALUES + 1)})


@pytest.mark.parametrize(("value", "want"), [
    ("x", "x"), (1.5, 1.5), (False, False), (None, None), (7, 7),
    (INT_MAX + 1, float(INT_MAX + 1)), (BIG, str(BIG)),
])
def test_scalar(value: Any, want: Any) -> None:
    got = scalar(value, "f")
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value", [[1], {"a": 1}, b"x"])
def test_scalar_refuses_containers(value: Any) -> None:
    with pytest.raises(InvalidInput) as err:
        scalar(value, "data")
    assert (err.value.reason, err.value.field) == ("wrong_shape", "data")


def test_location_of_names_the_keys_it_used() -> None:
    assert location_of({"lat": 1, "lon": 2, "x": 0}) == ([2.0, 1.0], "lat", "lon")
    assert location_of({"latitude": "1", "longitude": "2"}, coerce=True) == (
        [2.0, 1.0], "latitude", "longitude")
    assert location_of({"latitude": "1", "longitude": "2"}) is None
    assert location_of({"x": 1}) is None
