"""Table tests of the pure TTS parser against every TTS fixture, plus the documented traps."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import TtsApplication
from pipeline.errors import InvalidInput
from pipeline.events import Radio, Uplink, decode_uplink, encode
from pipeline.tts import Skipped, parse_event, parse_message

APP = TtsApplication(name="lab", app_id="app1")
RAW = TtsApplication(name="lab", app_id="app1", raw_payload_key="raw")
NOW = 1_800_000_000_000  # 2027-01-15T08:00:00Z: after every fixture's time

FixturePath = Callable[[str], Path]


def _event(body: bytes, app: TtsApplication = APP) -> Uplink | Skipped:
    return parse_event(body, app, received_ts_ms=NOW)


def _uplink(body: bytes, app: TtsApplication = APP) -> Uplink:
    up = _event(body, app)
    assert isinstance(up, Uplink)
    # Whatever the parser returns must survive the stream encoding unchanged.
    assert decode_uplink(encode(up)) == up
    return up


# --- every fixture -------------------------------------------------------------------------------

FIXTURE_UPLINKS: dict[str, Uplink] = {
    "tts-uplink-02.json": Uplink(
        event_id="tts:lab:sha1:e5e46618a07f9ea4582d986611c377d88642f493",
        source="tts",
        integration="lab",
        device="eui-70b3d52dd600035a",
        event_ts_ms=1744804453995,  # 2025-04-16T11:54:13.995136483Z, 9 digits truncated
        received_ts_ms=NOW,
        values={
            "batteryVoltage": 3.4,
            "pressEvent": 1,
            "sensorTemperature": 21.5,
            "singlePressEventCounter": 16,
            "thermistorProperlyConnected": True,
        },
        device_meta={
            "application_id": "starter-kit",
            "dev_eui": "70B3D52DD600035A",
            "join_eui": "EC656E0000000001",
            "dev_addr": "27FE87F6",
            "brand_id": "mclimate",
            "model_id": "mc-button",
            "hardware_version": "1.2",
            "firmware_version": "1.2",
            "band_id": "EU_863_870",
            "net_id": "000013",
            "tenant_id": "docs-test-account",
            "cluster_id": "eu1",
        },
        radio=Radio(
            rssi=-31.0, snr=9.5, gateways=1, f_cnt=14, f_port=2, data_rate="SF7BW125",
            frequency=867700000,
        ),
        kind="uplink",
    ),
    "tts-join-01.json": Uplink(
        event_id="tts:lab:as:up:01D2CT83AXQFQYQ35SR74CTWKH",
        source="tts",
        integration="lab",
        device="dev1",
        event_ts_ms=NOW,  # no received_at anywhere: ingest time
        received_ts_ms=NOW,
        device_meta={
            "application_id": "app1",
            "dev_eui": "4200000000000000",
            "join_eui": "4200000000000000",
            "dev_addr": "01DA1F15",
        },
        kind="join",
    ),
    "tts-join-02.json": Uplink(
        event_id="tts:lab:as:up:01E191YN5F2HMBQCBCVRF731VY",
        source="tts",
        integration="lab",
        device="dev1",
        event_ts_ms=1581925749935,
        received_ts_ms=NOW,
        device_meta={
            "application_id": "app1",
            "dev_eui": "0004A30B001C0530",
            "join_eui": "800000000000000C",
            "dev_addr": "01497ECC",
            "attributes.key1": "value1",
            "attributes.key2": "value2",
        },
        kind="join",
    ),
    "tts-join-03.json": Uplink(
        event_id="tts:lab:as:up:01G76SF1T4N87XN57MY6H36X4C",
        source="tts",
        integration="lab",
        device="dev2",
        event_ts_ms=1657011668804,
        received_ts_ms=NOW,
        device_meta={
            "application_id": "app1",
            "dev_eui": "70B3D57ED0050EAD",
            "join_eui": "0000000000000000",
            "dev_addr": "00FF52E3",
        },
        kind="join",
    ),
    "tts-uplink-11-minimal.json": Uplink(
        event_id="tts:lab:sha1:fce1e16a580d0fa051d554459187c928d43e8405",
        source="tts",
        integration="lab",
        device="dev1",
        event_ts_ms=1589286187087,
        received_ts_ms=NOW,
        values={"raw": "01"},
        device_meta={"application_id": "app1"},
        radio=Radio(gateways=0, f_cnt=327, f_port=1),
    ),
    "tts-uplink-01.json": Uplink(
        event_id="tts:lab:as:up:01D2CV8HNGJ57G25BW0FCZNY07",
        source="tts",
        integration="lab",
        device="dev1",
        event_ts_ms=NOW,
        received_ts_ms=NOW,
        values={"raw": b"Temperature = 0.0".hex()},
        device_meta={
            "application_id": "app1",
            "dev_eui": "4200000000000000",
            "join_eui": "4200000000000000",
            "dev_addr": "01DA1F15",
        },
        # f_cnt omitted in the JSON: it is 0; frequency is the string "868500000".
        radio=Radio(
            rssi=-35.0, snr=5.0, gateways=1, f_cnt=0, f_port=15, data_rate="SF7BW125",
            frequency=868500000,
        ),
    ),
}

#: Fixtures that carry no decoded_payload: parsed with ``raw_payload_key`` set.
NEEDS_RAW = {"tts-uplink-01.json", "tts-uplink-11-minimal.json"}


@pytest.mark.parametrize("name", sorted(FIXTURE_UPLINKS))
def test_fixture_uplinks_field_by_field(fixture_path: FixturePath, name: str) -> None:
    app = RAW if name in NEEDS_RAW else APP
    got = _uplink(fixture_path(f"tts/{name}").read_bytes(), app)
    assert got == FIXTURE_UPLINKS[name]


@pytest.mark.parametrize(
    ("name", "reason", "correlation_ids"),
    [
        ("tts-down-ack-01.json", "downlink_ack", ("my-correlation-id", "...")),
        ("tts-down-ack-02.json", "downlink_ack", ("as:downlink:01E19B99501X84X6CV471TVSZ1",)),
        ("tts-down-failed-01.json", "downlink_failed", ("as:downlink:01E19Z5W3BZBG7CXSJE9C0A3CE",)),
        ("tts-down-queued-01.json", "downlink_queued", ("as:downlink:01E84EAR5B4NM229NDKE0004J6",)),
    ],
)
def test_downlink_outcomes_are_not_uplinks(
    fixture_path: FixturePath, name: str, reason: str, correlation_ids: tuple[str, ...]
) -> None:
    body = fixture_path(f"tts/{name}").read_bytes()
    assert _event(body) == Skipped(reason=reason, device="dev1",  # type: ignore[arg-type]
                                   correlation_ids=correlation_ids)
    assert parse_message(body, APP, received_ts_ms=NOW) is None


@pytest.mark.parametrize(
    "name", ["tts-down-push-01.json", "tts-down-push-02.json", "tts-down-push-03.json",
             "tts-down-push-04.json"],
)
def test_downlink_push_bodies_are_refused_as_wrong_shape(
    fixture_path: FixturePath, name: str
) -> None:
    # Bodies we publish, never receive: not ApplicationUp messages.
    with pytest.raises(InvalidInput) as err:
        _event(fixture_path(f"tts/{name}").read_bytes())
    assert err.value.reason == "wrong_shape"


def test_invalid_fixture_gets_a_clear_error(fixture_path: FixturePath) -> None:
    with pytest.raises(InvalidInput) as err:
        _event(fixture_path("tts/tts-uplink-10-invalid.json").read_bytes())
    assert err.value.reason == "invalid_json"
    assert "byte 2017" in err.value.detail


def test_invalid_fixture_once_repaired_parses(fixture_path: FixturePath) -> None:
    text = fixture_path("tts/tts-uplink-10-invalid.json").read_text()
    missing_comma = '}\n    "received_at" : "2020-02-12T15'
    fixed = text.replace(missing_comma, "}," + missing_comma[1:])
    up = _uplink(fixed.encode())
    assert up.event_id == "tts:lab:as:up:01E0WZGT6Y7657CPFPE5WEYDSQ"
    assert up.values == {"temperature": 1.0, "luminosity": 0.64}
    assert up.radio == Radio(rssi=-35.0, snr=5.0, gateways=1, f_cnt=1, f_port=0,
                             data_rate="SF7BW125", frequency=868300000)
    assert up.device_meta["attributes.key1"] == "value1"
    assert up.device_meta["model_id"] == "the-things-uno"
    assert up.event_ts_ms == 1581520546014


def test_storage_ndjson_results_parse(fixture_path: FixturePath) -> None:
    lines = fixture_path("tts/tts-storage-01.ndjson").read_text().split("\n")
    ups = [_uplink(json.dumps(json.loads(ln)["result"]).encode(), RAW) for ln in lines if ln]
    assert [u.radio.f_cnt for u in ups if u.radio] == [43, 44]
    assert ups[0].event_ts_ms == 1598263724868
    assert ups[0].radio == Radio(gateways=1, f_cnt=43, f_port=10, data_rate="SF12BW125",
                                 frequency=868100000)
    assert ups[0].values == {"raw": "010a010a010a010a"}
    assert ups[0].event_id != ups[1].event_id


def test_simulated_uplinks(fixture_path: FixturePath) -> None:
    items = json.loads(fixture_path("tts/tts-storage-02-simulated.json").read_bytes())
    up = _uplink(json.dumps(items[0]).encode())
    assert up.simulated is True
    assert up.values == {"occupied": False, "type": "parking status"}
    # Top-level received_at is real; the NS time is the 0001-01-01 zero.
    assert up.event_ts_ms == 1612467151488
    assert up.radio == Radio(gateways=0, f_cnt=0, f_port=1)
    skip = TtsApplication(name="lab", app_id="app1", skip_simulated=True)
    assert _event(json.dumps(items[0]).encode(), skip) == Skipped(reason="simulated", device="dev1")
    # The array itself is not a message.
    with pytest.raises(InvalidInput) as err:
        _event(fixture_path("tts/tts-storage-02-simulated.json").read_bytes())
    assert err.value.reason == "wrong_shape"


def test_location_solved_fragment_wrapped(fixture_path: FixturePath) -> None:
    fragment = fixture_path("tts/tts-location-solved-01.fragment.txt").read_text()
    body = ('{"end_device_ids":{"device_id":"dev1","application_ids":{"application_id":"app1"}},'
            '"correlation_ids":["as:up:01LOC"],"received_at":"2021-01-01T00:00:00.123456789Z",'
            + fragment + "}")
    up = _uplink(body.encode())
    assert up.kind == "location"
    assert up.values == {"location": [5.458, 51.455], "location.accuracy": 15.0}
    assert up.device_meta["location_service"] == "lora-cloud-device-management-v1-wifi"
    assert up.event_id == "tts:lab:as:up:01LOC"
    assert up.event_ts_ms == 1609459200123


def test_no_decoded_payload_without_raw_key(fixture_path: FixturePath) -> None:
    with pytest.raises(InvalidInput) as err:
        _event(fixture_path("tts/tts-uplink-01.json").read_bytes())
    assert err.value.reason == "no_decoded_payload"
    assert err.value.field == "uplink_message.decoded_payload"


# --- traps the reference lists (built from its descriptions) -------------------------------------


def _msg(up: dict[str, Any], **top: Any) -> bytes:
    body = {"end_device_ids": {"device_id": "d1", "application_ids": {"application_id": "app1"}},
            "uplink_message": up, **top}
    return json.dumps(body).encode()


def test_packet_broker_gateways_and_best_snr() -> None:
    rx = [
        {"gateway_ids": {"gateway_id": "local", "eui": "00"}, "rssi": -110, "snr": -3.5,
         "time": "1970-01-10T16:12:13.942530Z"},
        {"gateway_ids": {"gateway_id": "local", "eui": "00"}, "antenna_index": 1, "rssi": -100,
         "snr": -1},
        {"gateway_ids": {"gateway_id": "packetbroker"}, "packet_broker": {"hops": []},
         "rssi": -90, "channel_rssi": -90, "snr": 7.25},
        {"gateway_ids": {"gateway_id": "packetbroker"}, "packet_broker": {}, "channel_rssi": -70},
    ]
    up = _uplink(_msg({"f_port": 3, "f_cnt": 9, "decoded_payload": {"t": 1}, "rx_metadata": rx,
                       "settings": {"data_rate": {"lora": {"bandwidth": 250000,
                                                           "spreading_factor": 12}},
                                    "frequency": "904100000"}}))
    assert up.radio == Radio(rssi=-90.0, snr=7.25, gateways=3, f_cnt=9, f_port=3,
                             data_rate="SF12BW250", frequency=904100000)


def test_empty_fport_and_empty_decoded_payload() -> None:
    up = _uplink(_msg({"frm_payload": "", "decoded_payload": {}, "f_cnt": 5}))
    assert up.values == {}
    assert up.radio == Radio(gateways=0, f_cnt=5, f_port=0)


def test_rssi_falls_back_to_channel_rssi() -> None:
    up = _uplink(_msg({"decoded_payload": {}, "rx_metadata": [
        {"gateway_ids": {"gateway_id": "g"}, "channel_rssi": -42, "snr": 1}]}))
    assert up.radio is not None and up.radio.rssi == -42.0


def test_flattening_rules() -> None:
    decoded = {
        "gps_0": {"latitude": 52.3, "longitude": 4.9, "altitude": 12},
        "accelerometer_1": {"x": 0.1, "y": -0.2, "z": 1},
        "pair": [1, 2.5],
        "triple": [1, 2, 3],
        "flags": [True, False],
        "messages": [{"measurementId": 4097, "measurementValue": 23.4, "type": "Air Temp"}],
        "Battery(%)": 90,
        "temp": "24°C",
        "nothing": None,
        "deep": {"er": {"est": True}},
    }
    up = _uplink(_msg({"decoded_payload": decoded}))
    assert up.values == {
        "gps_0": [4.9, 52.3],
        "gps_0.altitude": 12,
        "accelerometer_1.x": 0.1,
        "accelerometer_1.y": -0.2,
        "accelerometer_1.z": 1,
        "pair": [1.0, 2.5],
        "triple.0": 1,
        "triple.1": 2,
        "triple.2": 3,
        "flags.0": True,
        "flags.1": False,
        "messages.0.measurementId": 4097,
        "messages.0.measurementValue": 23.4,
        "messages.0.type": "Air Temp",
        "Battery(%)": 90,
        "temp": "24°C",
        "nothing": None,
        "deep.er.est": True,
    }


def test_location_objects_follow_the_shared_rules() -> None:
    decoded = {
        "gps": {"lat": 52.3, "lng": 4.9, "fix": 3},
        "alt": {"lat": 1, "lon": 2},
        "far": {"latitude": 95, "longitude": 4.9},  # out of range: plain keys, not refused
        "text": {"lat": "52.3", "lng": "4.9"},  # TTS does not coerce strings
        "latitude": 10, "longitude": 20,  # top level: plain keys (TTS sends location/solved)
        "big": 2**70, "huge": int("1" + "0" * 400),
    }
    up = _uplink(_msg({"decoded_payload": decoded}))
    assert up.values == {
        "gps": [4.9, 52.3], "gps.fix": 3,
        "alt": [2.0, 1.0],
        "far.latitude": 95, "far.longitude": 4.9,
        "text.lat": "52.3", "text.lng": "4.9",
        "latitude": 10, "longitude": 20,
        "big": float(2**70), "huge": "1" + "0" * 400,
    }


def test_event_id_is_deterministic_and_tells_messages_apart() -> None:
    a = _msg({"f_cnt": 1, "decoded_payload": {"t": 1}}, received_at="2024-01-01T00:00:00Z")
    b = _msg({"f_cnt": 2, "decoded_payload": {"t": 1}}, received_at="2024-01-01T00:00:00Z")
    assert _uplink(a).event_id == _uplink(a).event_id
    assert _uplink(a).event_id != _uplink(b).event_id
    # Ingest time never enters the id: a redelivery at another time is the same event.
    later = parse_event(a, APP, received_ts_ms=NOW + 5000)
    assert isinstance(later, Uplink) and later.event_id == _uplink(a).event_id


def test_uplink_received_at_is_used_when_top_level_is_missing() -> None:
    up = _uplink(_msg({"decoded_payload": {}, "received_at": "2024-01-01T00:00:01.5Z"}))
    assert up.event_ts_ms == 1704067201500
    zero = _uplink(_msg({"decoded_payload": {}, "received_at": "0001-01-01T00:00:00Z"}))
    assert zero.event_ts_ms == NOW
    garbage = _uplink(_msg({"decoded_payload": {}}, received_at="yesterday"))
    assert garbage.event_ts_ms == NOW


def test_service_data_is_skipped() -> None:
    body = json.dumps({"end_device_ids": {"device_id": "d1"},
                       "service_data": {"service": "x", "data": {}}}).encode()
    assert _event(body) == Skipped(reason="service_data", device="d1")


@pytest.mark.parametrize(
    ("body", "reason", "field"),
    [
        (b"", "invalid_json", "$"),
        (b"not json", "invalid_json", "$"),
        # Not UTF-8, inside a string or out: whichever way the msgspec version reports it.
        (b"\xff\xfe{", "invalid_encoding", "$"),
        (b'{"end_device_ids":{"device_id":"\x80"}}', "invalid_encoding", "$"),
        (b'{"end_device_ids":{"device_id":"d"},"uplink_message":{"decoded_payload":{"k":"\xc3"}}}',
         "invalid_encoding", "$"),
        # deeper than msgspec's own recursion limit
        (b'{"end_device_ids":{"device_id":"d"},"uplink_message":{"decoded_payload":'
         + b'{"a":' * 50_000, "wrong_shape", "$"),
        (b'{"end_device_ids":{"device_id":"d"},"uplink_message":{"decoded_payload":{"a":['
         + b",".join(b"1" for _ in range(600)) + b"]}}}", "too_many_values",
         "uplink_message.decoded_payload.a"),
        (b"[]", "wrong_shape", "$"),
        (b"42", "wrong_shape", "$"),
        (b'{"uplink_message":{}}', "wrong_shape", "end_device_ids.device_id"),
        (b'{"end_device_ids":{"device_id":"d"}}', "wrong_shape", "$"),
        (b'{"end_device_ids":{"device_id":"d"},"uplink_message":{"f_cnt":"x"}}', "wrong_shape",
         "uplink_message.f_cnt"),
        (b'{"end_device_ids":{"device_id":"d"},"uplink_message":{"decoded_payload":[1]}}',
         "wrong_shape", "uplink_message.decoded_payload"),
        (b'{"end_device_ids":{"device_id":"d"},"location_solved":{}}', "wrong_shape",
         "location_solved.location"),
        (b'{"end_device_ids":{"device_id":"d"},"uplink_message":{"frm_payload":"%%"}}',
         "wrong_shape", "uplink_message.frm_payload"),
    ],
)
def test_bad_input_names_its_problem(body: bytes, reason: str, field: str | None) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_event(body, RAW, received_ts_ms=NOW)
    assert err.value.reason == reason
    assert err.value.field == field


def test_too_large_and_too_deep() -> None:
    with pytest.raises(InvalidInput) as err:
        parse_event(b"{" + b" " * 300_000 + b"}", APP, received_ts_ms=NOW)
    assert err.value.reason == "too_large"
    deep: dict[str, Any] = {"v": 1}
    for _ in range(40):
        deep = {"a": deep}
    with pytest.raises(InvalidInput) as err:
        _event(_msg({"decoded_payload": deep}))
    assert err.value.reason == "wrong_shape"


# --- hostile and odd input (issue 10) ----------------------------------------------------------


def test_received_at_in_the_future_is_the_arrival_time() -> None:
    up = _uplink(_msg({"decoded_payload": {"t": 1}}, received_at="9999-12-31T23:59:59Z"))
    assert (up.event_ts_ms, up.event_ts_clamped) == (NOW, True)
    inner = _uplink(_msg({"decoded_payload": {"t": 1}, "received_at": "9999-12-31T23:59:59Z"}))
    assert (inner.event_ts_ms, inner.event_ts_clamped) == (NOW, True)
    soon = _uplink(_msg({"decoded_payload": {"t": 1}}, received_at="2027-01-15T08:05:00Z"))
    assert (soon.event_ts_ms, soon.event_ts_clamped) == (NOW + 300_000, False)
    tight = TtsApplication(name="lab", app_id="app1", max_clock_skew_s=0)
    up = _uplink(_msg({"decoded_payload": {"t": 1}}, received_at="2027-01-15T08:05:00Z"), tight)
    assert (up.event_ts_ms, up.event_ts_clamped) == (NOW, True)


@pytest.mark.parametrize("device", ["a" * 60_000, "a" * 65, "dev\r\n1", "dev\x001", "dev\u202e1",
                                    "dev 1"])
def test_odd_device_ids_are_refused_naming_the_field(device: str) -> None:
    body = json.dumps({"end_device_ids": {"device_id": device},
                       "uplink_message": {"decoded_payload": {"t": 1}}}).encode()
    with pytest.raises(InvalidInput) as err:
        _event(body)
    assert (err.value.reason, err.value.field) == ("invalid_field", "end_device_ids.device_id")
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("size", [60_000, 125])
def test_correlation_ids_over_128_bytes_are_hashed(size: int) -> None:
    cid = "as:up:" + "0" * size
    up = _uplink(_msg({"decoded_payload": {"t": 1}}, correlation_ids=[cid]))
    assert len(up.event_id.encode()) <= 128
    assert up.event_id == _uplink(_msg({"decoded_payload": {"t": 2}},
                                       correlation_ids=[cid])).event_id
    assert up.event_id != _uplink(_msg({"decoded_payload": {"t": 1}},
                                       correlation_ids=[cid + "1"])).event_id


@pytest.mark.parametrize("cids", [["as:up:01D2CV8HNGJ57G25BW0FCZNY07"], []])
def test_event_ids_are_scoped_by_integration(cids: list[str]) -> None:
    body = _msg({"decoded_payload": {"t": 1}, "f_cnt": 3}, correlation_ids=cids,
                received_at="2024-01-01T00:00:00Z")
    a = _uplink(body, TtsApplication(name="a", app_id="app1"))
    b = _uplink(body, TtsApplication(name="b", app_id="app1"))
    assert a.event_id != b.event_id
    assert a.event_id.startswith("tts:")


def _export(up: dict[str, Any], type_: str = "type.googleapis.com/ttn.lorawan.v3.ApplicationUp",
            name: str = "as.up.data.forward") -> bytes:
    """The Events API / Console export wrapping of an ApplicationUp."""
    return json.dumps({
        "name": name, "time": "2019-01-29T13:02:35.100Z",
        "identifiers": [{"device_ids": up["end_device_ids"]}],
        "data": {"@type": type_, **up},
        "correlation_ids": up.get("correlation_ids", []),
        "origin": "ip-10-100-5-54.eu-west-1.compute.internal", "context": {"tenant-id": "CgN0dG4="},
        "visibility": {"rights": ["RIGHT_APPLICATION_TRAFFIC_READ"]},
        "unique_id": "01D2CV8HP0AX4WS9R0M3P3Q5EF",
    }).encode()


@pytest.mark.parametrize("name", ["tts-uplink-01.json", "tts-join-02.json", "tts-uplink-02.json"])
def test_event_exports_parse_as_the_application_up_they_wrap(fixture_path: FixturePath,
                                                             name: str) -> None:
    body = fixture_path(f"tts/{name}").read_bytes()
    plain = _uplink(body, RAW)
    assert _uplink(_export(json.loads(body)), RAW) == plain


def test_event_exports_of_other_types_are_refused() -> None:
    up = json.loads(_msg({"decoded_payload": {"t": 1}}))
    with pytest.raises(InvalidInput) as err:
        _event(_export(up, type_="type.googleapis.com/ttn.lorawan.v3.ApplicationDownlink",
                       name="as.down.data.receive"))
    assert (err.value.reason, err.value.field) == ("wrong_shape", "data.@type")


@pytest.mark.parametrize("body", [b"[]", b"42", b'"x"', b"null"])
def test_a_body_that_is_not_an_object_names_the_whole_body(body: bytes) -> None:
    with pytest.raises(InvalidInput) as err:
        _event(body)
    assert (err.value.reason, err.value.field) == ("wrong_shape", "$")
