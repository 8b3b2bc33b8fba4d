"""The pure parts of downlinks: Blynk's webhook body, latest-wins, the TTS body, packing,
the Particle argument, echo value comparison."""

from __future__ import annotations

import base64
import json

import pytest

from pipeline import blynk_webhook, downlinks, echo
from pipeline.config import EncodeRule
from pipeline.errors import InvalidInput, Permanent

RECEIVED = 1_700_000_000_000


def parse(body: str, ctype: str = "application/json", query: dict[str, str] | None = None
          ) -> blynk_webhook.Downlink:
    return blynk_webhook.parse(body.encode(), ctype, query or {}, origin="app",
                               received_ts_ms=RECEIVED)


def test_documented_body_and_its_variants_give_the_same_command() -> None:
    js = parse('{"device_id":"5","device_authToken":"tok","device_pin":"v2",'
               '"device_pinValue":"1","timestamp_unix":"1700000000123","device_name":"n"}')
    form = parse("device_id=5&device_authToken=tok&device_pin=v2&device_pinValue=1&"
                 "timestamp_unix=1700000000123&device_name=n", "application/x-www-form-urlencoded")
    text = parse("device_id=5\ndevice_authToken=tok\ndevice_pin=v2\ndevice_pinValue=1\n"
                 "timestamp_unix=1700000000123\ndevice_name=n", "text/plain")
    query = parse("", "text/plain", {"id": "5", "token": "tok", "pin": "V2", "value": "1",
                                     "ts": "1700000000123", "name": "n"})
    assert js == form == text == query
    assert (js.pin, js.value, js.ts_ms, js.blynk_id, js.token) == ("V2", "1", 1700000000123, 5,
                                                                   "tok")
    assert js.event_id.startswith("bb:down:")


def test_seconds_become_milliseconds_and_unquoted_numbers_are_text() -> None:
    d = parse('{"device_id":5,"device_pin":"v3","device_pinValue":21.5,'
              '"timestamp_unix":1700000000}')
    assert d.ts_ms == 1_700_000_000_000 and d.value == "21.5"


@pytest.mark.parametrize("body,reason,field", [
    ('{"device_pin":"v2","device_pinValue":"1","timestamp_unix":"1"}', "missing_field",
     "device_id"),
    ('{"device_id":"5","device_pinValue":"1","timestamp_unix":"1"}', "missing_field",
     "device_pin"),
    ('{"device_id":"5","device_pin":"v2","timestamp_unix":"1"}', "missing_field",
     "device_pinValue"),
    ('{"device_id":"5","device_pin":"v2","device_pinValue":"1"}', "missing_field",
     "timestamp_unix"),
    ('{"device_id":"{device_id}","device_pin":"v2","device_pinValue":"1","timestamp_unix":"1"}',
     "unrendered_placeholder", "device_id"),
    ('{"device_id":"5","device_pin":"v256","device_pinValue":"1","timestamp_unix":"1"}',
     "wrong_pin", "device_pin"),
    ('{"device_id":"x","device_pin":"v2","device_pinValue":"1","timestamp_unix":"1"}',
     "wrong_shape", "device_id"),
    ('{"device_id":"5","device_pin":"v2","device_pinValue":"1","timestamp_unix":"-1"}',
     "wrong_shape", "timestamp_unix"),
    ('{"device_id":"5","device_pin":"v2","device_pinValue":"' + "x" * 1025
     + '","timestamp_unix":"1"}', "too_large", "device_pinValue"),
    ('{"device_id":"5","device_pin":"v2","device_pinValue":[1],"timestamp_unix":"1"}',
     "wrong_shape", "$.device_pinValue"),
    ("[1]", "wrong_shape", "$"),
    ("{", "invalid_json", "$"),
])
def test_bad_bodies_name_the_field(body: str, reason: str, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse(body)
    assert (info.value.reason, info.value.field) == (reason, field)


def test_latest_wins_by_blynk_time_then_stream_order() -> None:
    P = downlinks.Pending
    items = [P("d", "V1", 10, "5-0", "a"), P("d", "V1", 12, "3-0", "b"),
             P("d", "V1", 12, "4-0", "c"), P("d", "V2", 1, "1-0", "x"), P("e", "V1", 1, "1-0", "y")]
    kept, superseded = downlinks.latest_wins(items)
    assert sorted(p.item for p in kept) == ["c", "x", "y"]
    assert sorted(p.item for p in superseded) == ["a", "b"]


def test_tts_body_is_blynks_and_encode_rules_pack_bytes() -> None:
    body = json.loads(downlinks.tts_body(name="speed", pin="V2", ts_ms=1721202415068, value=3,
                                         f_port=5, correlation_id="bb:down:1"))
    assert body == {"downlinks": [{"f_port": 5, "decoded_payload": {
        "name": "speed", "pin": "v2", "ts": 1721202415068, "value": 3},
        "priority": "NORMAL", "correlation_ids": ["bb:down:1"]}]}
    rule = EncodeRule(pin="V2", type="int16", endian="little", f_port=9)
    packed = json.loads(downlinks.tts_body(name="speed", pin="V2", ts_ms=1, value=-2, f_port=5,
                                           correlation_id="c", encode=rule))["downlinks"][0]
    assert packed["f_port"] == 9 and "decoded_payload" not in packed
    assert base64.b64decode(packed["frm_payload"]) == b"\xfe\xff"
    assert downlinks.pack(EncodeRule(pin="V1", type="uint8"), 255) == b"\xff"
    assert downlinks.pack(EncodeRule(pin="V1", type="float32"), 1.5) == b"\x3f\xc0\x00\x00"
    for value in (256, 1.5, "on"):
        with pytest.raises(Permanent):
            downlinks.pack(EncodeRule(pin="V1", type="uint8"), value)


def test_particle_arg_template_and_limit() -> None:
    assert downlinks.particle_arg("{name}={value}", name="led", pin="V7", value=1.0,
                                  ts_ms=5) == "led=1"
    assert downlinks.particle_arg("{pin}:{value}@{ts}", name="x", pin="V7", value=[1.5, 2.0],
                                  ts_ms=5) == "v7:1.5,2@5"
    with pytest.raises(Permanent) as info:
        downlinks.particle_arg("{value}", name="x", pin="V1", value="é" * 513, ts_ms=0)
    assert info.value.reason == "arg_too_long"


@pytest.mark.parametrize("a,b", [(1, "1"), (1, "1.0"), (21.5, "21.50"), (True, "1"),
                                 ([1.5, 2.0], "1.5,2"), ("on", "on")])
def test_echo_compares_values_whatever_their_spelling(a: object, b: str) -> None:
    assert echo.canonical(a) == echo.canonical(b)  # type: ignore[arg-type]


def test_echo_tells_different_values_apart() -> None:
    assert echo.canonical(1) != echo.canonical("0")
    assert echo.canonical("on") != echo.canonical("On")
