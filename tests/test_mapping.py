"""Table tests for every mapping rule, with genuine fixture payloads as inputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import DatastreamConfig, KeyMapping, TemplateConfig
from pipeline.events import Radio, Uplink, Value
from pipeline.mapping import (
    Datastream,
    Mismatch,
    Template,
    coerce,
    datastreams_from_platform,
    describe_rejected,
    map_uplink,
    pin_of,
)

FixturePath = Callable[[str], Path]


def ds(name: str, pin: str, type_: Any = "double", **kw: Any) -> DatastreamConfig:
    return DatastreamConfig(name=name, pin=pin, type=type_, **kw)


def uplink(values: dict[str, Value], **kw: Any) -> Uplink:
    base: dict[str, Any] = dict(
        event_id="e1", source="tts", integration="app", device="dev1",
        event_ts_ms=1_700_000_000_000, received_ts_ms=1_700_000_000_100,
    )
    base.update(kw)
    return Uplink(values=values, **base)


def load_json(fixture_path: FixturePath, name: str) -> Any:
    return json.loads(fixture_path(name).read_text())


# The template of Blynk's TTS guide (temperature V0 double -100..100, humidity V1 integer 0..100,
# speed V2 enum) plus what the tts-uplink-02 mc-button decoder sends.
BUTTON = TemplateConfig(
    name="button",
    datastreams=[
        ds("batteryVoltage", "V0", "double", min=0, max=3.3),
        ds("pressEvent", "V1", "integer"),
        ds("sensorTemperature", "V2", "double", min=-100, max=100, history=True),
        ds("singlePressEventCounter", "V3", "integer", min=0, max=10),
        ds("thermistorProperlyConnected", "V4", "integer"),
        ds("RSSI", "V10", "integer", min=-110, max=0),
        ds("SNR", "V11", "double", min=1, max=30),
    ],
)


def test_tts_uplink_02_decoded_payload(fixture_path: FixturePath) -> None:
    msg = load_json(fixture_path, "tts/tts-uplink-02.json")
    up = msg["uplink_message"]
    gw = up["rx_metadata"][0]
    u = uplink(up["decoded_payload"], radio=Radio(rssi=gw["rssi"], snr=gw["snr"], gateways=1))
    out = map_uplink(Template.from_config(BUTTON), u)
    assert out.pins == {
        "V0": 3.3,  # 3.4 clamped to max 3.3
        "V1": 1,
        "V2": 21.5,
        "V3": 10,  # 16 clamped to max 10
        "V4": 1,  # true → 1
        "V10": -31,  # RSSI from the best gateway
        "V11": 9.5,  # SNR
    }
    assert out.rejected == [] and out.unmapped == []
    assert Template.from_config(BUTTON).history_pins == {"V2"}


def test_payload_rssi_wins_over_radio() -> None:
    out = map_uplink(Template.from_config(BUTTON), uplink({"RSSI": -50}, radio=Radio(rssi=-31)))
    assert out.pins == {"V10": -50}


def test_radio_clamped_and_rounded() -> None:
    out = map_uplink(Template.from_config(BUTTON), uplink({}, radio=Radio(rssi=-120.4, snr=0.5)))
    assert out.pins == {"V10": -110, "V11": 1.0}


def test_unmapped_keys_reported(fixture_path: FixturePath) -> None:
    msg = load_json(fixture_path, "tts/tts-uplink-02.json")
    only = TemplateConfig(name="t", datastreams=[ds("sensorTemperature", "V2")])
    out = map_uplink(Template.from_config(only), uplink(msg["uplink_message"]["decoded_payload"]))
    assert out.pins == {"V2": 21.5}
    assert sorted(out.unmapped) == [
        "batteryVoltage", "pressEvent", "singlePressEventCounter", "thermistorProperlyConnected",
    ]


GUIDE = TemplateConfig(
    name="guide",
    datastreams=[
        ds("temperature", "V0", "double", min=-100, max=100),
        ds("humidity", "V1", "integer", min=0, max=100),
        ds("speed", "V2", "enum", options={"low": 1, "mid": 2, "high": 3}, fallback=1),
        ds("state", "V3", "string"),
        ds("idle", "V4", "integer"),
        ds("location", "V5", "location"),
    ],
)


def test_blynk_guide_payload() -> None:
    # The decoded payload of Blynk's TTS getting-started guide, verbatim.
    payload = {"temperature": 24.1, "humidity": 54, "idle": False, "state": "Working",
               "location": [-73.935242, 40.730610]}
    out = map_uplink(Template.from_config(GUIDE), uplink(payload))  # type: ignore[arg-type]
    assert out.pins == {"V0": 24.1, "V1": 54, "V4": 0, "V3": "Working",
                        "V5": [-73.935242, 40.730610]}


# key → expected pin/value (or "mismatch"), one rule per row
CASES: list[tuple[str, str, Value, Any]] = [
    ("name", "temperature", 20, ("V0", 20.0)),
    ("name case-insensitive", "Temperature", 20, ("V0", 20.0)),
    ("pin lower", "v1", 50, ("V1", 50)),
    ("pin upper", "V1", 50, ("V1", 50)),
    ("bool true", "humidity", True, ("V1", 1)),
    ("bool false", "temperature", False, ("V0", 0.0)),
    ("numeric string double", "temperature", "20.00", ("V0", 20.0)),
    ("numeric string int", "humidity", " 42 ", ("V1", 42)),
    ("bool string", "humidity", "true", ("V1", 1)),
    ("integral float into integer", "humidity", 42.0, ("V1", 42)),
    ("fraction into integer", "humidity", 42.5, "mismatch"),
    ("clamp max", "humidity", 314, ("V1", 100)),
    ("clamp min", "humidity", -2, ("V1", 0)),
    ("clamp double", "temperature", 1e6, ("V0", 100.0)),
    ("int32 overflow", "idle", 2**31, "mismatch"),
    ("text into double", "temperature", "warm", "mismatch"),
    ("nan into double", "temperature", "nan", "mismatch"),
    ("null", "temperature", None, "mismatch"),
    ("list into double", "temperature", [1.0, 2.0], "mismatch"),
    ("number into string", "state", 12.5, ("V3", "12.5")),
    ("bool into string", "state", True, ("V3", "1")),
    ("long string", "state", "x" * 1025, "mismatch"),
    ("max string", "state", "é" * 512, ("V3", "é" * 512)),
    ("enum value", "speed", 2, ("V2", 2)),
    ("enum label", "speed", "high", ("V2", 3)),
    ("enum numeric string", "speed", "3", ("V2", 3)),
    ("enum fallback", "speed", 7, ("V2", 1)),
    ("enum text", "speed", "turbo", "mismatch"),
    ("location list", "location", [5.458, 51.455], ("V5", [5.458, 51.455])),
    ("location comma string", "V5", "-73.8731,40.8414", ("V5", [-73.8731, 40.8414])),
    ("location out of range", "location", [200.0, 10.0], "mismatch"),
    ("location wrong shape", "location", [1.0, 2.0, 3.0], "mismatch"),
]


@pytest.mark.parametrize(("rule", "key", "value", "expected"), CASES, ids=[c[0] for c in CASES])
def test_rules(rule: str, key: str, value: Value, expected: Any) -> None:
    out = map_uplink(Template.from_config(GUIDE), uplink({key: value, "other": 1}))
    assert out.unmapped == ["other"]
    if expected == "mismatch":
        assert out.pins == {}
        assert [r.key for r in out.rejected] == [key]
        assert out.rejected[0].reason == "type_mismatch"
        assert key in describe_rejected(out.rejected)
    else:
        assert out.rejected == []
        assert out.pins == {expected[0]: expected[1]}


def test_rejected_key_does_not_stop_the_rest() -> None:
    out = map_uplink(Template.from_config(GUIDE), uplink({"temperature": "hot", "humidity": 5}))
    assert out.pins == {"V1": 5}
    assert [(r.key, r.pin) for r in out.rejected] == [("temperature", "V0")]


def test_pin_without_datastream_is_unmapped_in_typed_template() -> None:
    out = map_uplink(Template.from_config(GUIDE), uplink({"v77": 1}))
    assert out.pins == {} and out.unmapped == ["v77"]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"latitude": 51.455, "longitude": 5.458, "accuracy": 15}, [5.458, 51.455]),
        ({"lat": "39.739155", "lng": "-104.984703"}, [-104.984703, 39.739155]),
        ({"gps_0.latitude": 1.5, "gps_0.longitude": 2.5}, [2.5, 1.5]),
    ],
    ids=["tts location_solved", "particle strings", "cayenne prefix"],
)
def test_location_from_pairs(values: dict[str, Value], expected: list[float]) -> None:
    out = map_uplink(Template.from_config(GUIDE), uplink(values, kind="location"))
    assert out.pins == {"V5": expected}


def test_location_pair_from_fixtures(fixture_path: FixturePath) -> None:
    # tts-location-solved-01 (fragment) and particle-webhook-03/04, flattened as ingest does.
    text = fixture_path("tts/tts-location-solved-01.fragment.txt").read_text()
    loc = json.loads("{" + text + "}")["location_solved"]["location"]
    out = map_uplink(Template.from_config(GUIDE), uplink(loc, kind="location"))
    assert out.pins == {"V5": [5.458, 51.455]}
    for name in ("particle/particle-webhook-03.json",
                 "particle/particle-webhook-04-custom-body.json"):
        coords = load_json(fixture_path, name)["coordinates"]
        out = map_uplink(Template.from_config(GUIDE), uplink(coords, source="particle"))
        assert out.pins == {"V5": [-104.984703, 39.739155]}


def test_separate_lat_lon_datastreams_stay_apart() -> None:
    t = TemplateConfig(name="t", datastreams=[ds("latitude", "V1"), ds("longitude", "V2")])
    out = map_uplink(Template.from_config(t), uplink({"latitude": 1.0, "longitude": 2.0}))
    assert out.pins == {"V1": 1.0, "V2": 2.0}


def test_firmware_version_is_not_a_datastream() -> None:
    out = map_uplink(Template.from_config(GUIDE),
                     uplink({"Blynk Firmware Version": "ttn-1.0.0", "humidity": 3}))
    assert out.firmware == "ttn-1.0.0"
    assert out.pins == {"V1": 3} and out.unmapped == []


def test_mapping_scale_offset_and_rename(fixture_path: FixturePath) -> None:
    # particle-webhook-02: {"Temperature/Kitchen":"20.00"} — a key that cannot be a datastream
    # name, renamed and converted (°C → °F) by the template's mapping.
    payload = load_json(fixture_path, "particle/particle-webhook-02.json")
    t = TemplateConfig(
        name="t",
        datastreams=[ds("kitchen", "V1", "double"), ds("count", "V2", "integer")],
        mapping={"Temperature/Kitchen": KeyMapping(to="kitchen", scale=1.8, offset=32),
                 "raw": KeyMapping(to="V2", scale=0.1)},
    )
    out = map_uplink(Template.from_config(t), uplink({**payload, "raw": 215}, source="particle"))
    assert out.pins == {"V1": pytest.approx(68.0), "V2": 22}  # 21.5 rounded into the integer


def test_particle_gauges_and_string_bool(fixture_path: FixturePath) -> None:
    gauge = load_json(fixture_path, "particle/particle-webhook-05.json")["gauges"][0]
    flag = load_json(fixture_path, "particle/particle-webhook-06.json")
    t = TemplateConfig(name="t", datastreams=[ds("click", "V1", "integer"),
                                              ds("value", "V2", "integer")])
    values: dict[str, Value] = {gauge["name"]: gauge["value"], **flag}
    out = map_uplink(Template.from_config(t), uplink(values, source="particle"))
    assert out.pins == {"V1": 2, "V2": 1}


def test_particle_product_event_data(fixture_path: FixturePath) -> None:
    event = load_json(fixture_path, "particle/particle-event-01-product.json")
    data = json.loads(event["data"])  # {"t":19,"v":1}: here `t` is a value, no token was sent
    t = TemplateConfig(name="t", datastreams=[ds("t", "V1", "integer"), ds("v", "V2", "integer")])
    out = map_uplink(Template.from_config(t),
                     uplink(data, source="particle", device_meta={"published_at":
                                                                  event["published_at"]}))
    assert out.pins == {"V1": 19, "V2": 1}


def test_particle_blueprint_shape(fixture_path: FixturePath) -> None:
    # The Blynk blueprint: the firmware publishes {"t": token, "v14".."v17"}; the webhook template
    # writes PARTICLE_PUBLISHED_AT to V6 (String).
    hook = load_json(fixture_path, "particle/particle-webhook-template-blynk.json")
    assert hook["query"]["V6"] == "{{PARTICLE_PUBLISHED_AT}}"
    t = TemplateConfig(
        name="blueprint",
        datastreams=[ds("last_publish", "V6", "string"), ds("millis", "V14", "integer"),
                     ds("v15", "V15", "double"), ds("switch", "V16", "integer", min=0, max=1),
                     ds("led", "V17", "integer", min=0, max=1)],
        mapping={"PARTICLE_PUBLISHED_AT": "V6"},
    )
    published: dict[str, Value] = {"t": "tok", "v14": 123456, "v15": 0.25, "v16": 1, "v17": 1}
    u = uplink(published, source="particle", token="tok",
               device_meta={"published_at": "2024-05-13T10:55:40.306Z"})
    out = map_uplink(Template.from_config(t), u)
    assert out.pins == {"V6": "2024-05-13T10:55:40.306Z", "V14": 123456, "V15": 0.25,
                        "V16": 1, "V17": 1}
    assert out.unmapped == []
    # Without device_meta the event time is written in Particle's format.
    u2 = uplink({"v14": 1}, source="particle", token="tok", event_ts_ms=1715597740306)
    assert map_uplink(Template.from_config(t), u2).pins["V6"] == "2024-05-13T10:55:40.306Z"


def test_untyped_template_passes_pins_through() -> None:
    out = map_uplink(Template("none"), uplink({"t": "tok", "v14": 5, "V16": True, "x": 1},
                                              source="particle", token="tok"))
    assert out.pins == {"V14": 5, "V16": 1} and out.unmapped == ["x"]


def test_coerce_and_pins() -> None:
    d = Datastream("x", "V1", "integer", min=0, max=10)
    assert coerce(d, "7") == 7
    with pytest.raises(Mismatch):
        coerce(d, "7.5")
    assert pin_of("v255") == "V255" and pin_of("v256") is None and pin_of("a1") is None


def test_platform_datastreams() -> None:
    rows = [
        {"id": 1, "label": "Temperature", "alias": "Temperature", "units": "Celsius",
         "type": "DOUBLE", "pin": 1, "pinType": "VIRTUAL", "min": -40, "max": 85},
        {"id": 2, "label": "DS 1", "alias": "DS 1", "type": "INT", "defaultValue": 5, "pin": 2,
         "pinType": "VIRTUAL"},
        {"id": 3, "label": "Digital", "type": "INT", "pin": 3, "pinType": "DIGITAL"},
    ]
    pulled = datastreams_from_platform(rows)
    assert [(d.name, d.pin, d.type, d.min, d.max) for d in pulled] == [
        ("Temperature", "V1", "double", -40.0, 85.0), ("DS 1", "V2", "integer", None, None)]
    # Declared datastreams override pulled ones on the same pin.
    t = Template.from_config(
        TemplateConfig(name="t", pull=True, datastreams=[ds("Temp", "V1", "integer")]), pulled)
    assert t.by_pin["V1"].type == "integer" and t.by_pin["V2"].name == "DS 1"


# Issue 10, item 14: location objects as ingest hands them over (through the real parsers)
# reach the template's only location datastream, whatever the object's key.
def _tts_values(fixture_path: FixturePath, decoded: dict[str, Any]) -> dict[str, Value]:
    from pipeline.config import TtsApplication
    from pipeline.tts import parse_message

    msg = load_json(fixture_path, "tts/tts-uplink-02.json")
    msg["uplink_message"]["decoded_payload"] = decoded
    u = parse_message(json.dumps(msg).encode(), TtsApplication(name="a", app_id="app1"),
                      received_ts_ms=1)
    assert u is not None
    return u.values


@pytest.mark.parametrize(
    ("decoded", "expected"),
    [
        ({"gps_0": {"latitude": 52.3, "longitude": 4.9, "altitude": 12}}, [4.9, 52.3]),
        ({"gps_1": {"lat": 52.3, "lon": 4.9}, "temperature_2": 20.5}, [4.9, 52.3]),
        ({"coordinates": {"lat": "39.7", "lng": "-104.9"}}, [-104.9, 39.7]),
        ({"pos": {"here": {"Latitude": 1.5, "Longitude": 2.5}}}, [2.5, 1.5]),
    ],
    ids=["cayenne gps_0", "lat/lon numbers", "lat/lng strings", "nested, capitalised"],
)
def test_tts_location_objects_fill_the_only_location_datastream(
        fixture_path: FixturePath, decoded: dict[str, Any], expected: list[float]) -> None:
    values = _tts_values(fixture_path, decoded)
    out = map_uplink(Template.from_config(GUIDE), uplink(values))
    assert out.pins.get("V5") == expected
    assert not any(k.lower().endswith(("lat", "lon", "lng", "latitude", "longitude"))
                   for k in out.unmapped)


@pytest.mark.parametrize("name", ["particle-webhook-03.json",
                                  "particle-webhook-04-custom-body.json"])
def test_particle_coordinates_fill_the_only_location_datastream(
        fixture_path: FixturePath, name: str) -> None:
    from pipeline.config import ParticleProduct
    from pipeline.particle import parse_webhook

    body = fixture_path(f"particle/{name}").read_bytes()
    u = parse_webhook(body, "application/json", ParticleProduct(name="p"), received_ts_ms=1,
                      query={"coreid": "e00fce68ece1d3d21a73dcc9"})
    out = map_uplink(Template.from_config(GUIDE), u)
    assert out.pins.get("V5") == [-104.984703, 39.739155] and out.unmapped == []


def test_a_location_key_of_its_own_wins_and_a_second_pair_stays_unmapped(
        fixture_path: FixturePath) -> None:
    values = _tts_values(fixture_path, {"gps_0": {"latitude": 1.0, "longitude": 2.0},
                                        "location": {"lat": 3.0, "lng": 4.0}})
    out = map_uplink(Template.from_config(GUIDE), uplink(values))
    assert out.pins.get("V5") == [4.0, 3.0] and out.unmapped == ["gps_0"]
