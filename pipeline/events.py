"""Stream contracts: every value that crosses a process boundary.

Each stream entry holds one field (``d``) with one msgpack-encoded Struct. Structs only grow by
adding fields with defaults, so a newer worker reads an older entry and vice versa (fields it does
not know are ignored by msgspec). ``BlynkWrite``, the one written per uplink on the hot path, is
a msgpack *array* of its fields in order (no field names: ~65 bytes less per entry, which each
``XADD`` and egress's reads pay for in Redis): its fields are only ever appended at the end.
Entries written as a map before it (upgrade) are still read.

Encoders and decoders are created once here; use :func:`encode` and the ``decode_*`` helpers
rather than building new ones on a hot path.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

from pipeline.errors import Reason
from pipeline.redact import masked_repr

#: The value of one decoded key as the device sent it (after ingest flattening).
Value = int | float | str | bool | list[float] | None

Source = Literal["particle", "tts"]
UplinkKind = Literal["uplink", "join", "location", "status"]

#: The single field name every stream entry carries its payload under.
FIELD = b"d"
#: A field a replayed dead letter's uplinks entry carries beside :data:`FIELD`: transform lets
#: it take its event over from whatever entry claimed it (:mod:`pipeline.dedup`).
REPLAY = b"r"


class Radio(msgspec.Struct, omit_defaults=True, kw_only=True):
    """LoRaWAN radio metadata of one uplink (best gateway by SNR)."""

    rssi: float | None = None
    snr: float | None = None
    gateways: int = 0
    f_cnt: int | None = None
    f_port: int | None = None
    data_rate: str | None = None
    frequency: int | None = None


class Uplink(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One message from a device cloud, normalized (ingest → transform)."""

    event_id: str
    source: Source
    integration: str
    device: str
    event_ts_ms: int
    received_ts_ms: int
    values: dict[str, Value] = msgspec.field(default_factory=dict)
    device_meta: dict[str, str] = msgspec.field(default_factory=dict)
    radio: Radio | None = None
    kind: UplinkKind = "uplink"
    #: Blynk token carried in the message itself (Particle blueprint ``t`` field).
    token: str | None = None
    simulated: bool = False
    #: ``event_ts_ms`` is the arrival time because the sent time lay too far in the future.
    event_ts_clamped: bool = False

    def __repr__(self) -> str:
        return masked_repr(self)


class BlynkWrite(msgspec.Struct, omit_defaults=True, kw_only=True, array_like=True):
    """Datastream values for one Blynk device (transform → egress).

    ``pins`` maps a pin (``V1``) to its value already checked against the datastream type and
    clamped; a location is ``[lon, lat]``. Encoded as an array: new fields go at the end, with
    a default (module docstring).
    """

    token: str
    server: str
    device_key: str
    pins: dict[str, Value]
    event_ts_ms: int
    received_ts_ms: int
    event_id: str
    #: Pins whose datastream keeps history, so late points may be written with true times.
    history_pins: list[str] = msgspec.field(default_factory=list)

    def __repr__(self) -> str:
        return masked_repr(self)


class _MapWrite(BlynkWrite, array_like=False):
    """A ``BlynkWrite`` as written before it was an array (a msgpack map of field names), read
    from entries already in the writes streams at an upgrade."""


class Downlink(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A datastream change made in Blynk, bound for a device (ingest-http → downlink).

    The Blynk device is named as Blynk's webhook names it (``blynk_id`` and/or ``token``); the
    downlink stage resolves it to its source device through the registry's reverse index.
    ``value`` is the text Blynk sent; it is typed against the pin's datastream by the stage.
    """

    #: ``bb:down:<hex>``: deterministic from (Blynk device, pin, ts, value), so a repeated
    #: webhook carries the same id; it is the TTS correlation id of the command.
    event_id: str
    #: The ``blynk_webhooks`` entry it came through.
    origin: str
    #: ``V2``: canonical (upper-case) pin.
    pin: str
    value: Value
    #: Blynk's update time (ms).
    ts_ms: int
    received_ts_ms: int
    blynk_id: int | None = None
    token: str | None = None
    device_name: str | None = None

    def __repr__(self) -> str:
        return masked_repr(self)


class DeadLetter(msgspec.Struct, omit_defaults=True, kw_only=True):
    """An entry a stage gave up on, kept with everything needed to replay it.

    Build one with :func:`dead_letter` (the only builder): ``raw`` is cut to
    :data:`DEAD_RAW_MAX` bytes, and then ``raw_size``/``raw_digest`` say what the whole was —
    a truncated letter can be identified and matched to its source, but not replayed.
    """

    stream: str
    entry_id: str
    raw: bytes
    stage: str
    reason: str
    detail: str
    attempts: int
    dead_ts_ms: int
    #: Size of the original raw bytes when ``raw`` was truncated (0: ``raw`` is whole).
    raw_size: int = 0
    #: BLAKE2b-128 hex digest of the original raw bytes when ``raw`` was truncated.
    raw_digest: str = ""

    @property
    def truncated(self) -> bool:
        return self.raw_size > len(self.raw)


#: Raw bytes kept in a dead letter. Authenticated senders can make every message fail; without
#: a cap each dead letter would cost Redis a whole request body for the retention time.
DEAD_RAW_MAX = 8 * 1024
#: Characters of ``detail`` kept in a dead letter.
DEAD_DETAIL_MAX = 2000


def dead_letter(*, stream: str, entry_id: str, raw: bytes, stage: str, reason: Reason,
                detail: str, attempts: int, dead_ts_ms: int) -> DeadLetter:
    """The dead letter of ``raw`` (an entry of ``stream``, or ``entry_id=""`` for input that
    never became one), bounded in size whatever the input."""
    size = len(raw)
    if size <= DEAD_RAW_MAX:
        return DeadLetter(stream=stream, entry_id=entry_id, raw=raw, stage=stage, reason=reason,
                          detail=detail[:DEAD_DETAIL_MAX], attempts=attempts,
                          dead_ts_ms=dead_ts_ms)
    return DeadLetter(stream=stream, entry_id=entry_id, raw=raw[:DEAD_RAW_MAX], stage=stage,
                      reason=reason, detail=detail[:DEAD_DETAIL_MAX], attempts=attempts,
                      dead_ts_ms=dead_ts_ms, raw_size=size,
                      raw_digest=hashlib.blake2b(raw, digest_size=16).hexdigest())


_encoder = msgspec.msgpack.Encoder()
_uplink_decoder = msgspec.msgpack.Decoder(Uplink)
_write_decoder = msgspec.msgpack.Decoder(BlynkWrite)
_map_write_decoder = msgspec.msgpack.Decoder(_MapWrite)
_downlink_decoder = msgspec.msgpack.Decoder(Downlink)
_dead_decoder = msgspec.msgpack.Decoder(DeadLetter)


def encode(event: Uplink | BlynkWrite | Downlink | DeadLetter) -> bytes:
    """Encode one event to msgpack bytes."""
    return _encoder.encode(event)


def decode_uplink(data: bytes) -> Uplink:
    """Decode an ``Uplink``; raises ``msgspec.ValidationError``/``DecodeError`` on bad bytes."""
    return _uplink_decoder.decode(data)


def decode_write(data: bytes) -> BlynkWrite:
    """Decode a ``BlynkWrite`` (an array, or the map written before: module docstring); raises
    ``msgspec.ValidationError``/``DecodeError`` on bad bytes."""
    if data and (0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF)):  # msgpack map headers
        return BlynkWrite(**msgspec.structs.asdict(_map_write_decoder.decode(data)))
    return _write_decoder.decode(data)


def fields(event: msgspec.Struct) -> Any:
    """An event as JSON-able builtins with its fields by name — for display, where secrets are
    masked by field name (``msgspec.to_builtins`` gives an array-encoded ``BlynkWrite`` as a
    list)."""
    return msgspec.to_builtins(msgspec.structs.asdict(event))


def decode_downlink(data: bytes) -> Downlink:
    """Decode a ``Downlink``; raises ``msgspec.ValidationError``/``DecodeError`` on bad bytes."""
    return _downlink_decoder.decode(data)


def decode_dead(data: bytes) -> DeadLetter:
    """Decode a ``DeadLetter``; raises ``msgspec.ValidationError``/``DecodeError`` on bad bytes."""
    return _dead_decoder.decode(data)
