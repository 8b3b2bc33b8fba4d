"""Event times: RFC 3339 text → Unix milliseconds, and the clamp on times from the future.

Pure; the one home of both rules for every source (Particle's ``published_at``, TTS's
``received_at``, over webhooks and MQTT).

:func:`rfc3339_ms` reads ``YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)``: ``T`` or ``t`` or a space
between date and time, ``Z`` or ``z``, any number of fractional digits (TTS sends nanoseconds;
digits past the millisecond are dropped, towards the past), a leap second ``:60``. A time
without an offset is taken as UTC (Particle templates sometimes drop it). Anything else — a date
alone, week dates, out-of-range fields, text over :data:`MAX_TEXT` characters — is ``None``;
each caller decides whether that is an error.

:func:`clamp_future` is the ordering guard: egress never writes a value older than the last one
written for a pin, so one event time far in the future (a device clock set to 9999, a forged
``received_at``) would make every later genuine value stale. Times later than arrival plus the
allowed skew become the arrival time, and the caller counts it.
"""

from __future__ import annotations

import re
from datetime import date

#: Longer text is not a time (bounds the work on hostile input).
MAX_TEXT = 64

_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(?:[Zz]|([+-])(\d\d):(\d\d))?",
    re.ASCII,  # \d would take any script's digits, which int() reads too
)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
#: ``YYYY-MM-DDTHH:MM`` → Unix ms of that minute, of minutes the full parse found valid (in
#: UTC: no offset follows in the shape :func:`_millis_utc` takes): a fleet's event times share
#: a few minutes. Emptied when full (bounds memory on hostile input).
_MINUTES: dict[str, int] = {}
_MINUTES_MAX = 4096


def rfc3339_ms(text: str) -> int | None:
    """Milliseconds since the Unix epoch of an RFC 3339 time, ``None`` if ``text`` is not one."""
    if 24 <= len(text) <= MAX_TEXT:
        ms = _millis_utc(text)
        if ms is not None:
            return ms
    if len(text) > MAX_TEXT:
        return None
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = m.groups()
    try:
        days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None
    h, mi, s = int(hour), int(minute), int(second)
    if h > 23 or mi > 59 or s > 60:
        return None
    minute_ms = ((days * 24 + h) * 60 + mi) * 60_000
    if len(_MINUTES) >= _MINUTES_MAX:
        _MINUTES.clear()
    _MINUTES[text[:16]] = minute_ms
    ms = minute_ms + s * 1000
    if fraction:
        ms += int(fraction[:3].ljust(3, "0"))
    if sign:
        oh, om = int(off_h), int(off_m)
        if oh > 23 or om > 59:
            return None
        offset_ms = (oh * 60 + om) * 60_000
        ms += -offset_ms if sign == "+" else offset_ms
    return ms


def _millis_utc(text: str) -> int | None:
    """The common shapes alone, ``YYYY-MM-DDTHH:MM:SS.mmm…Z`` with at least 3 fractional
    digits (Particle's ``published_at`` and ``toISOString``: 3; TTS's ``received_at``: 9) in a
    minute seen before, without the regex and the date arithmetic (~40% of parsing a Particle
    webhook, ``bench/ingest_http.py``). ``None``: let the full parse decide. Gives what the full
    parse gives (``tests/test_eventtime.py`` compares them)."""
    minute_ms = _MINUTES.get(text[:16])
    if minute_ms is None or text[-1] != "Z" or text[16] != ":" or text[19] != ".":
        return None
    digits = text[17:19] + text[20:-1]
    if not (digits.isascii() and digits.isdigit()):
        return None
    s = int(digits[:2])
    return None if s > 60 else minute_ms + s * 1000 + int(digits[2:5])


def clamp_future(event_ts_ms: int, received_ts_ms: int, max_skew_ms: int) -> tuple[int, bool]:
    """``(event time, False)``, or ``(received_ts_ms, True)`` when the event time is more than
    ``max_skew_ms`` after the arrival: such a time is a wrong clock, not a future event."""
    if event_ts_ms > received_ts_ms + max_skew_ms:
        return received_ts_ms, True
    return event_ts_ms, False
