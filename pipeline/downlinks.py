"""Downlinks, the pure parts: latest-wins coalescing, and what is sent to TTS and Particle.

* :func:`latest_wins` — per device and pin only the newest command (by Blynk time, then stream
  order) is sent; the others are superseded (acked, counted, never sent).
* :func:`tts_body` — exactly what Blynk's own TTS integration sends:
  ``{"downlinks":[{"f_port":…,"decoded_payload":{"name":…,"pin":"v2","ts":…,"value":…},
  "priority":"NORMAL","correlation_ids":["bb:down:…"]}]}`` (pin lower-case, ``ts`` the Blynk
  update time), or with ``frm_payload`` instead when an :class:`~pipeline.config.EncodeRule`
  packs the value into bytes for a device with no downlink formatter.
* :func:`particle_arg` — the ``arg`` of a Particle function call from its template
  (``{name}={value}`` by default); over Particle's 1,024 bytes it is refused.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

from pipeline.config import EncodeRule
from pipeline.errors import Permanent, Reason
from pipeline.events import Value

#: Particle's limit on a function argument (bytes; Device OS 1.x and later).
PARTICLE_ARG_MAX = 1024

T = TypeVar("T")

_json = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Pending(Generic[T]):
    """One command as coalescing sees it: device, pin, Blynk time, stream entry id."""

    device_key: str
    pin: str
    ts_ms: int
    entry_id: str
    item: T


def _order(p: Pending[T]) -> tuple[int, int, int]:
    ms, _, seq = p.entry_id.partition("-")
    return p.ts_ms, int(ms or 0), int(seq or 0)


def latest_wins(pending: Iterable[Pending[T]]) -> tuple[list[Pending[T]], list[Pending[T]]]:
    """``(newest per (device, pin), superseded)``; ties on Blynk time go to the later entry."""
    best: dict[tuple[str, str], Pending[T]] = {}
    superseded: list[Pending[T]] = []
    for p in pending:
        key = (p.device_key, p.pin)
        cur = best.get(key)
        if cur is None:
            best[key] = p
        elif _order(p) > _order(cur):
            superseded.append(cur)
            best[key] = p
        else:
            superseded.append(p)
    return list(best.values()), superseded


def tts_body(*, name: str, pin: str, ts_ms: int, value: Value, f_port: int, correlation_id: str,
             encode: EncodeRule | None = None) -> bytes:
    """The ``down/push`` / ``down/replace`` body of one command (see module doc)."""
    item: dict[str, object] = {"f_port": f_port}
    if encode is not None:
        item["frm_payload"] = base64.b64encode(pack(encode, value)).decode()
        if encode.f_port is not None:
            item["f_port"] = encode.f_port
    else:
        item["decoded_payload"] = {"name": name, "pin": pin.lower(), "ts": ts_ms,
                                   "value": value}
    item["priority"] = "NORMAL"
    item["correlation_ids"] = [correlation_id]
    return _json.encode({"downlinks": [item]})


_FORMATS = {"uint8": "B", "int8": "b", "uint16": "H", "int16": "h", "uint32": "I",
            "int32": "i", "float32": "f"}


def pack(rule: EncodeRule, value: Value) -> bytes:
    """The value's bytes by ``rule``; a value that does not fit is :class:`Permanent`
    (``encode_failed``)."""
    fmt = (">" if rule.endian == "big" else "<") + _FORMATS[rule.type]
    number: int | float
    if isinstance(value, bool):
        number = int(value)
    elif isinstance(value, int | float):
        number = value
    else:
        raise Permanent(f"{rule.pin}: {value!r} is not a number to pack as {rule.type}",
                        reason=Reason.ENCODE_FAILED)
    if rule.type != "float32" and isinstance(number, float):
        if not number.is_integer():
            raise Permanent(f"{rule.pin}: {number!r} is not an integer ({rule.type})",
                            reason=Reason.ENCODE_FAILED)
        number = int(number)
    try:
        return struct.pack(fmt, number)
    except (struct.error, OverflowError) as exc:
        raise Permanent(f"{rule.pin}: {number!r} does not fit {rule.type}: {exc}",
                        reason=Reason.ENCODE_FAILED) from None


def encode_rule(rules: Sequence[EncodeRule], pin: str) -> EncodeRule | None:
    for rule in rules:
        if rule.pin.upper() == pin:
            return rule
    return None


def value_text(value: Value) -> str:
    """A value as Particle firmware reads it: numbers plainly, a location ``lon,lat``."""
    if isinstance(value, list):
        return ",".join(value_text(v) for v in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def particle_arg(template: str, *, name: str, pin: str, value: Value, ts_ms: int) -> str:
    """The function argument; over :data:`PARTICLE_ARG_MAX` bytes is :class:`Permanent`
    (``arg_too_long``)."""
    arg = (template.replace("{name}", name).replace("{pin}", pin.lower())
           .replace("{ts}", str(ts_ms)).replace("{value}", value_text(value)))
    size = len(arg.encode())
    if size > PARTICLE_ARG_MAX:
        raise Permanent(f"Particle function argument of {size} bytes is over the "
                        f"{PARTICLE_ARG_MAX}-byte limit", reason=Reason.ARG_TOO_LONG)
    return arg
