"""Blynk's webhook body (trigger "Device Datastream Update") → :class:`~pipeline.events.Downlink`
(pure).

The body the README tells users to paste into Blynk's console (Custom JSON; each key is the
placeholder that fills it)::

    {"device_id": "{device_id}", "device_authToken": "{device_authToken}",
     "device_pin": "{device_pin}", "device_pinValue": "{device_pinValue}",
     "timestamp_unix": "{timestamp_unix}", "device_name": "{device_name}"}

The same keys are accepted as a Web Form (``application/x-www-form-urlencoded``), as query
parameters (Blynk's "Query parameters" rows, any method), and as Plain text holding
``key=value`` pairs separated by ``&`` or new lines. Short aliases are accepted too: ``id``,
``token``, ``pin``, ``value``, ``ts``, ``name``.

Rules, each failure an :class:`~pipeline.errors.InvalidInput` naming the field:

* ``device_id`` (digits) or ``device_authToken`` must be present (``missing_field``); the pin
  and its value are required, and so is ``timestamp_unix`` (de-duplication and the TTL rest on
  Blynk's update time);
* a value still reading ``{placeholder}`` means Blynk did not fill it — the placeholder is not
  available for the webhook's trigger (``unrendered_placeholder``);
* the pin is ``v0``..``v255`` (either case; ``wrong_pin``); the value is text of at most 1,024
  bytes (Blynk's string limit; ``too_large``); a JSON number or boolean is taken as its text;
* ``timestamp_unix`` below 10^11 is taken as seconds (Blynk's unit is not documented), else
  milliseconds.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from pipeline.errors import InvalidInput, Reason
from pipeline.events import Downlink

#: Blynk's maximum string value (bytes).
VALUE_MAX_BYTES = 1024
#: Longest device id / token / name kept.
_FIELD_MAX = 256
_PIN = re.compile(r"[vV]([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])")
_UNRENDERED = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?\}")
#: Accepted key → canonical field.
_ALIASES = {
    "device_id": "id", "id": "id", "deviceId": "id",
    "device_authToken": "token", "token": "token",
    "device_pin": "pin", "pin": "pin",
    "device_pinValue": "value", "value": "value",
    "timestamp_unix": "ts", "ts": "ts",
    "device_name": "name", "name": "name",
}
#: The placeholder each canonical field documents (named in errors).
_PLACEHOLDER = {"id": "device_id", "token": "device_authToken", "pin": "device_pin",
                "value": "device_pinValue", "ts": "timestamp_unix", "name": "device_name"}
_SECONDS_BELOW = 10**11

_json_any = msgspec.json.Decoder()


def fields_of(body: bytes, content_type: str, query: Mapping[str, str]) -> dict[str, str]:
    """The canonical fields of a webhook request (query parameters, then the body)."""
    out: dict[str, str] = {}
    _take(out, query.items(), "query")
    if not body.strip():
        return out
    if content_type == "application/json" or body.lstrip()[:1] == b"{":
        try:
            obj = _json_any.decode(body)
        except msgspec.DecodeError as exc:
            raise InvalidInput(f"body is not JSON: {exc}", reason=Reason.INVALID_JSON,
                               field="$") from None
        if not isinstance(obj, dict):
            raise InvalidInput("JSON body must be an object", reason=Reason.WRONG_SHAPE, field="$")
        _take(out, obj.items(), "$")
        return out
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise InvalidInput("body is not UTF-8", reason=Reason.INVALID_ENCODING, field="$") from None
    pairs: list[tuple[str, str]] = []
    for part in re.split(r"[\r\n]+", text):
        pairs += parse_qsl(part.strip(), keep_blank_values=True, max_num_fields=64)
    _take(out, pairs, "$")
    return out


def _take(out: dict[str, str], items: Any, where: str) -> None:
    for key, value in items:
        field = _ALIASES.get(key)
        if field is None:
            continue  # other placeholders (metadata, user_*): allowed, not used
        if isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, int | float):
            value = repr(value) if isinstance(value, float) else str(value)
        elif not isinstance(value, str):
            raise InvalidInput(f"{key} must be text or a number", reason=Reason.WRONG_SHAPE,
                               field=key if where == "query" else f"$.{key}")
        out[field] = value


def parse(body: bytes, content_type: str, query: Mapping[str, str], *, origin: str,
          received_ts_ms: int) -> Downlink:
    """One webhook request → one Downlink; raises :class:`InvalidInput` (see module doc)."""
    f = fields_of(body, content_type, query)
    for name, value in f.items():
        if _UNRENDERED.fullmatch(value.strip()):
            raise InvalidInput(
                f"{_PLACEHOLDER[name]} arrived as {value.strip()[:40]!r}: Blynk did not fill "
                "the placeholder (not available for this webhook's trigger?)",
                reason=Reason.UNRENDERED_PLACEHOLDER, field=_PLACEHOLDER[name])
    blynk_id: int | None = None
    raw_id = f.get("id", "").strip()
    if raw_id:
        if not raw_id.isascii() or not raw_id.isdigit() or len(raw_id) > 18:
            raise InvalidInput(f"device_id must be digits, got {raw_id[:40]!r}",
                               reason=Reason.WRONG_SHAPE, field="device_id")
        blynk_id = int(raw_id)
    token = f.get("token", "").strip() or None
    if blynk_id is None and token is None:
        raise InvalidInput("the body names no device: add device_id and/or device_authToken",
                           reason=Reason.MISSING_FIELD, field="device_id")
    if token is not None and len(token) > _FIELD_MAX:
        raise InvalidInput("device_authToken is too long", reason=Reason.TOO_LARGE,
                           field="device_authToken")
    pin_text = _required(f, "pin").strip()
    if not _PIN.fullmatch(pin_text):
        raise InvalidInput(f"device_pin must be v0..v255, got {pin_text[:40]!r}",
                           reason=Reason.WRONG_PIN, field="device_pin")
    pin = "V" + pin_text[1:]
    value = _required(f, "value")
    if len(value.encode()) > VALUE_MAX_BYTES:
        raise InvalidInput(f"device_pinValue is over Blynk's {VALUE_MAX_BYTES}-byte limit",
                           reason=Reason.TOO_LARGE, field="device_pinValue")
    ts_text = _required(f, "ts").strip()
    if not ts_text.isascii() or not ts_text.isdigit() or len(ts_text) > 16:
        raise InvalidInput(f"timestamp_unix must be digits, got {ts_text[:40]!r}",
                           reason=Reason.WRONG_SHAPE, field="timestamp_unix")
    ts = int(ts_text)
    ts_ms = ts * 1000 if ts < _SECONDS_BELOW else ts
    device_name = f.get("name", "")[:_FIELD_MAX] or None
    return Downlink(event_id=event_id(blynk_id, token, pin, ts_ms, value), origin=origin,
                    pin=pin, value=value, ts_ms=ts_ms, received_ts_ms=received_ts_ms,
                    blynk_id=blynk_id, token=token, device_name=device_name)


def _required(f: Mapping[str, str], name: str) -> str:
    value = f.get(name)
    if value is None:
        raise InvalidInput(f"{_PLACEHOLDER[name]} is missing", reason=Reason.MISSING_FIELD,
                           field=_PLACEHOLDER[name])
    return value


def event_id(blynk_id: int | None, token: str | None, pin: str, ts_ms: int, value: str) -> str:
    """``bb:down:<hex>``, the same for every delivery of one Blynk update.

    The value is part of it: with a timestamp in seconds two commands of one second differ.
    """
    who = token if token is not None else f"#{blynk_id}"
    digest = hashlib.blake2b(f"{who}\0{pin}\0{ts_ms}\0{value}".encode(), digest_size=10)
    return f"bb:down:{digest.hexdigest()}"
