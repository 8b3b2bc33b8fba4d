"""The Things Stack v3 messages (MQTT ``up``/``join``/``location/solved``, webhooks) → ``Uplink``.

Pure: bytes in, an :class:`~pipeline.events.Uplink` (or a :class:`Skipped` note) out; no I/O, no
clock (the caller passes ``received_ts_ms``). The JSON is decoded once by a typed msgspec decoder
that knows only the fields used here; every other field is ignored, every field is optional
(TTS omits zero values: ``f_cnt`` 0, ``f_port`` 0, ``confirmed`` false).

Traps handled (see ``shared/reference/tts-particle-formats.md`` §1.3): omitted zero fields,
``frequency`` sent as a string, RFC 3339 times with 9 fractional digits, the ``0001-01-01``
zero time of simulated uplinks, Packet Broker gateways without an EUI, garbage gateway times
(never used), missing ``decoded_payload`` after a formatter error. An Events API / Console export
(``{"name": "as.up.data.forward", …, "data": {"@type": "…ApplicationUp", …}}``) is read as the
ApplicationUp it wraps; an export of another type is ``wrong_shape`` at ``data.@type``.

Device ids must match :data:`pipeline.ids.DEVICE_ID` (else ``invalid_field``); event ids are
scoped by :func:`pipeline.ids.event_id` (``tts:<integration>:as:up:…``). The event time is the
AS ``received_at`` (:func:`pipeline.eventtime.rfc3339_ms`), clamped to the receive time when it
lies more than ``max_clock_skew_s`` ahead (``Uplink.event_ts_clamped``; the caller counts it).

``decoded_payload`` becomes ``Uplink.values`` by :func:`pipeline.values.flatten` (dotted keys,
``[lon, lat]`` for location objects, ``key.0``… for lists). Unlike Particle, coordinates are not
coerced from strings (a payload formatter sends numbers) and there is no top-level location:
top-level ``latitude``/``longitude`` stay plain keys (TTS itself publishes such payloads as
``location/solved``, which becomes a ``location`` uplink). An odd location object never rejects
an uplink; it stays plain keys. Too deep, or more than
:data:`pipeline.values.MAX_VALUES` values, is refused (``wrong_shape``, ``too_many_values``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Any

import msgspec

from pipeline import metrics
from pipeline.config import TtsApplication
from pipeline.errors import InvalidInput, Reason
from pipeline.events import Radio, Uplink, UplinkKind, Value
from pipeline.eventtime import clamp_future, rfc3339_ms
from pipeline.ids import check_device, event_id
from pipeline.jsonbody import undecodable
from pipeline.values import flatten

#: Bodies above this are refused (``too_large``): TTS messages are a few KB at most.
MAX_BODY_BYTES = 256 * 1024
_DECODED = "uplink_message.decoded_payload."


# --- the TTS JSON, only the fields we read -------------------------------------------------------


class _AppIds(msgspec.Struct, gc=False):
    application_id: str = ""


class _DeviceIds(msgspec.Struct, gc=False):
    device_id: str = ""
    application_ids: _AppIds | None = None
    dev_eui: str | None = None
    join_eui: str | None = None
    dev_addr: str | None = None


class _GatewayIds(msgspec.Struct, gc=False):
    gateway_id: str = ""
    eui: str | None = None


class _RxMetadata(msgspec.Struct, gc=False):
    gateway_ids: _GatewayIds | None = None
    rssi: float | None = None
    channel_rssi: float | None = None
    snr: float | None = None


class _Lora(msgspec.Struct, gc=False):
    bandwidth: int = 0
    spreading_factor: int = 0


class _DataRate(msgspec.Struct, gc=False):
    lora: _Lora | None = None


class _Settings(msgspec.Struct, gc=False):
    data_rate: _DataRate | None = None
    # uint64 in protobuf JSON is a string; accept a number too.
    frequency: str | int | None = None


class _VersionIds(msgspec.Struct, gc=False):
    brand_id: str | None = None
    model_id: str | None = None
    hardware_version: str | None = None
    firmware_version: str | None = None
    band_id: str | None = None


class _NetworkIds(msgspec.Struct, gc=False):
    net_id: str | None = None
    tenant_id: str | None = None
    cluster_id: str | None = None


class _UplinkMessage(msgspec.Struct, gc=False):
    f_port: int = 0
    f_cnt: int = 0
    frm_payload: str = ""
    decoded_payload: dict[str, Any] | None = None
    rx_metadata: list[_RxMetadata] = msgspec.field(default_factory=list)
    settings: _Settings | None = None
    received_at: str | None = None
    version_ids: _VersionIds | None = None
    network_ids: _NetworkIds | None = None
    attributes: dict[str, str] | None = None


class _JoinAccept(msgspec.Struct, gc=False):
    received_at: str | None = None
    attributes: dict[str, str] | None = None


class _Location(msgspec.Struct, gc=False):
    latitude: float
    longitude: float
    altitude: float | None = None
    accuracy: float | None = None
    source: str | None = None


class _LocationSolved(msgspec.Struct, gc=False):
    service: str = ""
    location: _Location | None = None


class _ApplicationUp(msgspec.Struct, gc=False):
    end_device_ids: _DeviceIds | None = None
    correlation_ids: list[str] = msgspec.field(default_factory=list)
    received_at: str | None = None
    simulated: bool = False
    uplink_message: _UplinkMessage | None = None
    join_accept: _JoinAccept | None = None
    location_solved: _LocationSolved | None = None
    # Not turned into uplinks; only their presence matters.
    service_data: Any = None
    downlink_queued: Any = None
    downlink_sent: Any = None
    downlink_ack: Any = None
    downlink_nack: Any = None
    downlink_failed: Any = None
    downlink_queue_invalidated: Any = None
    # An Events API / Console export wraps the ApplicationUp: {"name": …, "data": {"@type": …}}.
    type: str | None = msgspec.field(default=None, name="@type")
    data: _ApplicationUp | None = None


_decoder = msgspec.json.Decoder(_ApplicationUp)
_APPLICATION_UP = "type.googleapis.com/ttn.lorawan.v3.ApplicationUp"

_OUTCOMES = (
    "downlink_queued",
    "downlink_sent",
    "downlink_ack",
    "downlink_nack",
    "downlink_failed",
    "downlink_queue_invalidated",
    "service_data",
)

class Skipped(msgspec.Struct, frozen=True, kw_only=True):
    """A valid TTS message that is deliberately not an uplink (a downlink outcome, service
    data, or a simulated uplink the application skips)."""

    reason: Reason
    device: str
    #: For downlink outcomes: the downlink's own correlation ids (``as:downlink:…``).
    correlation_ids: tuple[str, ...] = ()


# --- entry points --------------------------------------------------------------------------------


def parse_message(body: bytes, app: TtsApplication, *, received_ts_ms: int) -> Uplink | None:
    """Parse one TTS message for ``app``; ``None`` means "valid, but not an uplink".

    ``None`` covers downlink outcomes, ``service_data`` and simulated uplinks skipped by
    ``app.skip_simulated``; each is counted in ``bb_tts_skipped_total``. Callers that need to
    tell them apart use :func:`parse_event`. Raises :class:`~pipeline.errors.InvalidInput` with
    reason ``too_large``, ``invalid_json``, ``invalid_encoding``, ``wrong_shape``,
    ``invalid_field`` or ``no_decoded_payload``; ``field`` names the field (``$``: the body).
    """
    event = parse_event(body, app, received_ts_ms=received_ts_ms)
    if isinstance(event, Skipped):
        metrics.TTS_SKIPPED.labels(app.name, event.reason).inc()
        return None
    return event


def parse_event(
    body: bytes, app: TtsApplication, *, received_ts_ms: int, max_bytes: int = MAX_BODY_BYTES
) -> Uplink | Skipped:
    """Like :func:`parse_message`, but says what a non-uplink message was; counts nothing."""
    if len(body) > max_bytes:
        raise InvalidInput(
            f"message of {len(body)} bytes is over the {max_bytes}-byte limit",
            reason=Reason.TOO_LARGE,
            field="$",
        )
    try:
        msg = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidInput(str(exc), reason=Reason.WRONG_SHAPE, field=_field_of(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise undecodable(body, exc) from None
    except RecursionError:
        raise InvalidInput("JSON nested too deeply", reason=Reason.WRONG_SHAPE, field="$") from None

    if msg.end_device_ids is None and msg.data is not None:
        msg = _unwrap(msg.data)
    ids = msg.end_device_ids
    if ids is None or not ids.device_id:
        raise InvalidInput(
            "no end_device_ids.device_id", reason=Reason.WRONG_SHAPE,
            field="end_device_ids.device_id"
        )
    device = check_device(ids.device_id, "end_device_ids.device_id")
    app_id = ids.application_ids.application_id if ids.application_ids else ""

    kind: UplinkKind
    values: dict[str, Value]
    radio: Radio | None = None
    meta = _device_meta(ids, app_id)
    up = msg.uplink_message
    if up is not None:
        if msg.simulated and app.skip_simulated:
            return Skipped(reason=Reason.SIMULATED, device=device)
        kind = "uplink"
        values = _uplink_values(up, app)
        radio = _radio(up)
        _uplink_meta(up, meta)
    elif msg.join_accept is not None:
        kind = "join"
        values = {}
        if msg.join_accept.attributes:
            meta.update({f"attributes.{k}": v for k, v in msg.join_accept.attributes.items()})
    elif msg.location_solved is not None:
        kind = "location"
        loc = msg.location_solved.location
        if loc is None:
            raise InvalidInput(
                "location_solved has no location",
                reason=Reason.WRONG_SHAPE,
                field="location_solved.location",
            )
        values = _location_values("location", loc)
        if msg.location_solved.service:
            meta["location_service"] = msg.location_solved.service
    else:
        for name in _OUTCOMES:
            outcome = getattr(msg, name)
            if outcome is not None:
                return Skipped(
                    reason=Reason(name),
                    device=device,
                    correlation_ids=_outcome_correlation_ids(outcome),
                )
        raise InvalidInput(
            "neither uplink_message, join_accept, location_solved nor a downlink event",
            reason=Reason.WRONG_SHAPE,
            field="$",
        )

    received_at = _event_time_text(msg)
    sent_ts_ms = rfc3339_ms(received_at) if received_at else None
    event_ts_ms, clamped = clamp_future(
        sent_ts_ms if sent_ts_ms is not None else received_ts_ms, received_ts_ms,
        int(app.max_clock_skew_s * 1000))
    return Uplink(
        event_id=event_id("tts", app.name,
                          _local_event_id(msg, app_id or app.app_id, device, kind, received_at)),
        source="tts",
        integration=app.name,
        device=device,
        event_ts_ms=event_ts_ms,
        received_ts_ms=received_ts_ms,
        values=values,
        device_meta=meta,
        radio=radio,
        kind=kind,
        simulated=msg.simulated,
        event_ts_clamped=clamped,
    )


def _unwrap(data: _ApplicationUp) -> _ApplicationUp:
    """The ApplicationUp inside an event export (``as.up.data.forward`` and its kin)."""
    if data.type != _APPLICATION_UP:
        raise InvalidInput(
            f"an event export of {str(data.type)[:100]!r}, not of an ApplicationUp",
            reason=Reason.WRONG_SHAPE,
            field="data.@type",
        )
    return data


# --- pieces --------------------------------------------------------------------------------------

_AT_PATH = re.compile(r"at `\$\.?([^`]*)`")


def _field_of(exc: msgspec.ValidationError) -> str:
    """``Expected `int`, got `str` - at `$.uplink_message.f_cnt``` → ``uplink_message.f_cnt``;
    ``$`` when the body itself is the wrong type."""
    m = _AT_PATH.search(str(exc))
    return m.group(1) if m and m.group(1) else "$"


def _device_meta(ids: _DeviceIds, app_id: str) -> dict[str, str]:
    meta: dict[str, str] = {}
    if app_id:
        meta["application_id"] = app_id
    if ids.dev_eui:
        meta["dev_eui"] = ids.dev_eui
    if ids.join_eui:
        meta["join_eui"] = ids.join_eui
    if ids.dev_addr:
        meta["dev_addr"] = ids.dev_addr
    return meta


def _uplink_meta(up: _UplinkMessage, meta: dict[str, str]) -> None:
    v = up.version_ids
    if v is not None:
        for key, value in (("brand_id", v.brand_id), ("model_id", v.model_id),
                           ("hardware_version", v.hardware_version),
                           ("firmware_version", v.firmware_version), ("band_id", v.band_id)):
            if value:
                meta[key] = value
    n = up.network_ids
    if n is not None:
        for key, value in (("net_id", n.net_id), ("tenant_id", n.tenant_id),
                           ("cluster_id", n.cluster_id)):
            if value:
                meta[key] = value
    if up.attributes:
        meta.update({f"attributes.{k}": v for k, v in up.attributes.items()})


def _uplink_values(up: _UplinkMessage, app: TtsApplication) -> dict[str, Value]:
    if up.decoded_payload is not None:
        return flatten(up.decoded_payload, where=_DECODED)
    if app.raw_payload_key:
        try:
            raw = base64.b64decode(up.frm_payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(
                "frm_payload is not base64",
                reason=Reason.WRONG_SHAPE,
                field="uplink_message.frm_payload",
            ) from None
        return {app.raw_payload_key: raw.hex()}
    raise InvalidInput(
        "uplink has no decoded_payload (no payload formatter, or it failed) and the "
        "application maps no raw payloads (raw_payload_key)",
        reason=Reason.NO_DECODED_PAYLOAD,
        field="uplink_message.decoded_payload",
    )


def _location_values(name: str, loc: _Location) -> dict[str, Value]:
    values: dict[str, Value] = {name: [loc.longitude, loc.latitude]}
    if loc.altitude is not None:
        values[f"{name}.altitude"] = loc.altitude
    if loc.accuracy is not None:
        values[f"{name}.accuracy"] = loc.accuracy
    return values


def _radio(up: _UplinkMessage) -> Radio:
    best_rssi: float | None = None
    best_snr: float | None = None
    best_rank = (_NO_RANK, _NO_RANK)
    named: set[str] = set()
    anonymous = 0
    for rx in up.rx_metadata:
        gid = rx.gateway_ids.gateway_id if rx.gateway_ids is not None else ""
        # Several antennas of one gateway are one gateway; Packet Broker entries all share the
        # id "packetbroker" but each is a different forwarder's gateway.
        if gid and gid != "packetbroker":
            named.add(gid)
        else:
            anonymous += 1
        rssi = rx.rssi if rx.rssi is not None else rx.channel_rssi
        # Best gateway: highest SNR, then highest RSSI; missing values rank last.
        rank = (rx.snr if rx.snr is not None else _NO_RANK,
                rssi if rssi is not None else _NO_RANK)
        if rank > best_rank:
            best_rank, best_rssi, best_snr = rank, rssi, rx.snr
    data_rate = frequency = None
    settings = up.settings
    if settings is not None:
        lora = settings.data_rate.lora if settings.data_rate is not None else None
        if lora is not None and lora.spreading_factor and lora.bandwidth:
            data_rate = f"SF{lora.spreading_factor}BW{lora.bandwidth // 1000}"
        frequency = _int_or_none(settings.frequency)
    return Radio(
        rssi=best_rssi,
        snr=best_snr,
        gateways=len(named) + anonymous,
        f_cnt=up.f_cnt,
        f_port=up.f_port,
        data_rate=data_rate,
        frequency=frequency,
    )


_NO_RANK = float("-inf")


def _int_or_none(v: str | int | None) -> int | None:
    if v is None or isinstance(v, int):
        return v
    try:
        return int(v)
    except ValueError:
        return None


_ZERO_TIME = "0001-01-01"


def _event_time_text(msg: _ApplicationUp) -> str | None:
    """Top-level ``received_at`` (AS time), else the NS time unless it is the simulated zero."""
    if msg.received_at and not msg.received_at.startswith(_ZERO_TIME):
        return msg.received_at
    for inner in (msg.uplink_message, msg.join_accept):
        at = inner.received_at if inner is not None else None
        if at and not at.startswith(_ZERO_TIME):
            return at
    return None


def _local_event_id(
    msg: _ApplicationUp, app_id: str, device: str, kind: str, received_at: str | None
) -> str:
    """The ``as:up:`` correlation id (one per AS event), else a hash of what identifies it
    (:func:`pipeline.ids.event_id` scopes it to the integration)."""
    for cid in msg.correlation_ids:
        if cid.startswith("as:up:"):
            return cid
    f_cnt = msg.uplink_message.f_cnt if msg.uplink_message is not None else 0
    key = f"tts\0{app_id}\0{device}\0{kind}\0{f_cnt}\0{received_at or ''}"
    return "sha1:" + hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()


def _outcome_correlation_ids(outcome: Any) -> tuple[str, ...]:
    if isinstance(outcome, dict):
        inner = outcome.get("downlink", outcome)
        cids = inner.get("correlation_ids") if isinstance(inner, dict) else None
        if isinstance(cids, list):
            return tuple(c for c in cids if isinstance(c, str))
    return ()
