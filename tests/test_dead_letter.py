"""The one dead-letter builder: bounded whatever the input, and a truncated letter says so."""

from __future__ import annotations

import hashlib

import msgspec

from pipeline import events
from pipeline.events import DEAD_DETAIL_MAX, DEAD_RAW_MAX, dead_letter


def _letter(raw: bytes, detail: str = "why") -> events.DeadLetter:
    return dead_letter(stream="bb:uplinks", entry_id="1-0", raw=raw, stage="transform",
                       reason="type_mismatch", detail=detail, attempts=2, dead_ts_ms=5)


def test_small_raw_is_kept_whole_and_round_trips() -> None:
    letter = _letter(b"x" * DEAD_RAW_MAX)
    assert letter.raw == b"x" * DEAD_RAW_MAX and not letter.truncated
    assert letter.raw_size == 0 and letter.raw_digest == ""
    assert events.decode_dead(events.encode(letter)) == letter


def test_large_raw_is_cut_with_its_size_and_digest() -> None:
    raw = bytes(range(256)) * 250  # 64,000 bytes, like a body at the ingest limit
    letter = events.decode_dead(events.encode(_letter(raw, detail="d" * 10_000)))
    assert letter.truncated
    assert letter.raw == raw[:DEAD_RAW_MAX]
    assert letter.raw_size == len(raw)
    assert letter.raw_digest == hashlib.blake2b(raw, digest_size=16).hexdigest()
    assert len(letter.detail) == DEAD_DETAIL_MAX
    assert len(events.encode(letter)) < DEAD_RAW_MAX + DEAD_DETAIL_MAX + 200


def test_letters_written_before_the_new_fields_still_decode() -> None:
    class Old(msgspec.Struct, kw_only=True):
        stream: str
        entry_id: str
        raw: bytes
        stage: str
        reason: str
        detail: str
        attempts: int
        dead_ts_ms: int

    old = Old(stream="s", entry_id="", raw=b"r", stage="x", reason="y", detail="z",
              attempts=1, dead_ts_ms=1)
    letter = events.decode_dead(msgspec.msgpack.encode(old))
    assert not letter.truncated and letter.raw == b"r"
