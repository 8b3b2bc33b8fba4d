"""The wire encoding of ``BlynkWrite``: an array of its fields, and the map written before it
still read (entries already in the writes streams at an upgrade)."""

from __future__ import annotations

import msgspec

from blynk_bridge.ops import mask_secrets
from pipeline import events

WRITE = events.BlynkWrite(token="0123456789abcdef0123456789abcdef", server="https://fra1.blynk.cloud",
                          device_key="tts:app1:eui-0000000000000001",
                          pins={"V0": 21.5, "V1": 7, "V5": [13.4, 52.5]},
                          event_ts_ms=1_765_000_000_001, received_ts_ms=1_765_000_000_051,
                          event_id="as:up:01ABC", history_pins=["V0"])


class _Before(msgspec.Struct, omit_defaults=True, kw_only=True):
    """``BlynkWrite`` as it was encoded before it became an array."""

    token: str
    server: str
    device_key: str
    pins: dict[str, events.Value]
    event_ts_ms: int
    received_ts_ms: int
    event_id: str
    history_pins: list[str] = msgspec.field(default_factory=list)


def test_a_write_is_an_array_without_field_names() -> None:
    data = events.encode(WRITE)
    assert isinstance(msgspec.msgpack.decode(data), list)
    assert b"device_key" not in data and b"event_ts_ms" not in data
    assert events.decode_write(data) == WRITE
    before = msgspec.msgpack.encode(_Before(**msgspec.structs.asdict(WRITE)))
    assert len(data) < len(before) - 60


def test_a_write_encoded_as_the_map_before_is_still_read() -> None:
    for w in (WRITE, msgspec.structs.replace(WRITE, history_pins=[])):
        before = msgspec.msgpack.encode(_Before(**msgspec.structs.asdict(w)))
        got = events.decode_write(before)
        assert type(got) is events.BlynkWrite and got == w
        assert events.encode(got) == events.encode(w)  # re-encoded as the array


def test_a_write_with_fields_appended_later_is_read() -> None:
    class Later(events.BlynkWrite, kw_only=True):
        extra: int = 5

    later = Later(**msgspec.structs.asdict(WRITE))
    assert events.decode_write(events.encode(later)) == WRITE


def test_fields_names_every_field_so_secrets_are_masked() -> None:
    shown = mask_secrets(events.fields(WRITE))
    assert shown["device_key"] == WRITE.device_key and shown["pins"]["V0"] == 21.5
    assert WRITE.token not in str(shown)
