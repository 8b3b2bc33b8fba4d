"""Table tests of the one RFC 3339 reader and the future-time clamp (pipeline.eventtime)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import eventtime
from pipeline.eventtime import MAX_TEXT, clamp_future, rfc3339_ms

T0 = 1_485_983_285_763  # 2017-02-01T21:08:05.763Z


@pytest.mark.parametrize(("text", "want"), [
    ("2017-02-01T21:08:05.763Z", T0),
    ("2017-02-01T21:08:05.763z", T0),
    ("2017-02-01t21:08:05.763Z", T0),
    ("2017-02-01 21:08:05.763Z", T0),
    ("2017-02-01T21:08:05.763", T0),  # no offset: UTC
    ("2017-02-01T21:08:05.763+00:00", T0),
    ("2017-02-01T21:08:05.763-00:00", T0),
    ("2017-02-01T23:08:05.763+02:00", T0),
    ("2017-02-01T15:38:05.763-05:30", T0),
    # TTS: nanoseconds; digits past the millisecond are dropped, not rounded
    ("2017-02-01T21:08:05.763999999Z", T0),
    ("2017-02-01T21:08:05.7639Z", T0),
    ("2017-02-01T21:08:05.76Z", T0 - 3),
    ("2017-02-01T21:08:05.7Z", T0 - 63),
    ("2017-02-01T21:08:05Z", T0 - 763),
    ("1970-01-01T00:00:00Z", 0),
    ("1969-12-31T23:59:59.5Z", -500),
    ("0001-01-01T00:00:00Z", -62_135_596_800_000),  # TTS's zero time (callers skip it)
    ("9999-12-31T23:59:59Z", 253_402_300_799_000),
    ("2016-12-31T23:59:60Z", 1_483_228_800_000),  # a leap second: the next second's start
    # not times
    ("", None), ("yesterday", None), ("2017-02-01", None), ("2017-W05-3T21:08:05Z", None),
    ("20170201T210805Z", None), ("2017-02-30T00:00:00Z", None), ("2017-13-01T00:00:00Z", None),
    ("2017-02-01T24:00:00Z", None), ("2017-02-01T21:60:00Z", None),
    ("2017-02-01T21:08:61Z", None), ("2017-02-01T21:08:05+24:00", None),
    ("2017-02-01T21:08:05+0200", None), ("2017-02-01T21:08:05.Z", None),
    ("2017-02-01T21:08:05Z ", None), (" 2017-02-01T21:08:05Z", None),
    ("0000-01-01T00:00:00Z", None), ("２０17-02-01T21:08:05Z", None),
    ("2017-02-01T21:08:05." + "1" * MAX_TEXT + "Z", None),
])
def test_rfc3339_ms(text: str, want: int | None) -> None:
    assert rfc3339_ms(text) == want


@given(st.datetimes(timezones=st.just(UTC)))
def test_agrees_with_datetime(dt: datetime) -> None:
    want = (dt - datetime(1970, 1, 1, tzinfo=UTC)) // datetime.resolution // 1000
    assert rfc3339_ms(dt.isoformat().replace("+00:00", "Z")) == want


@given(st.text(max_size=40))
def test_any_text_is_a_time_or_none(text: str) -> None:
    assert rfc3339_ms(text) is None or isinstance(rfc3339_ms(text), int)


def _both_paths(text: str) -> tuple[int | None, int | None]:
    """(the full parse, the short cut for a date seen before) of ``text``."""
    eventtime._MINUTES.clear()
    full = rfc3339_ms(text)  # nothing cached: the regex decides (and caches a valid minute)
    return full, rfc3339_ms(text)


_TIME_CHARS = "0123456789-:.TtZz+ x٣"


@given(st.datetimes(timezones=st.just(UTC)), st.integers(3, 12), st.integers(0, 40),
       st.sampled_from(_TIME_CHARS))
def test_the_short_cut_agrees_with_the_full_parse(dt: datetime, digits: int, at: int,
                                                   char: str) -> None:
    # The shapes the short cut takes (Particle: 3 fractional digits, TTS: 9), and each with one
    # character changed.
    fraction = f"{dt.microsecond:06d}{dt.microsecond % 997:03d}{dt.day:03d}"[:digits]
    text = f"{dt.year:04d}-{dt:%m-%dT%H:%M:%S}.{fraction}Z"
    full, short = _both_paths(text)
    assert full == short and full is not None
    at = at % len(text)
    mutated = text[:at] + char + text[at + 1:]
    full, short = _both_paths(mutated)
    assert full == short


@pytest.mark.parametrize(("event", "received", "skew", "want"), [
    (1_000, 1_000, 300_000, (1_000, False)),
    (301_000, 1_000, 300_000, (301_000, False)),  # exactly the allowed skew: kept
    (301_001, 1_000, 300_000, (1_000, True)),
    (253_402_300_799_000, 1_000, 300_000, (1_000, True)),
    (-5, 1_000, 300_000, (-5, False)),  # the past is never clamped: older values are just old
    (1_001, 1_000, 0, (1_000, True)),
])
def test_clamp_future(event: int, received: int, skew: int, want: tuple[int, bool]) -> None:
    assert clamp_future(event, received, skew) == want
