"""Dead letters as operators handle them: read back, summarised, replayed.

One home for what ``blynk-bridge dead`` (:mod:`blynk_bridge.ops`) and the monitor's status page
(:mod:`pipeline.status_page`) do with the dead stream — every dead stream: one on one Redis,
one per partition besides it in the cluster layout (:meth:`pipeline.keys.Keys.dead_streams`);
reads merge them newest first and each row names its stream. Ids of different dead streams
may be equal (each master makes its own), so a letter of a partition's dead stream is named
``<partition>/<entry id>`` (:func:`dead_id`); one of ``keys.dead`` by its entry id alone.
Reads are bounded by their ``limit``; :func:`replay` is at-least-once (see there). Summaries
never carry a token or a credential header's value in full (:func:`pipeline.redact.redact_text`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from pipeline import events
from pipeline.backlog import as_str
from pipeline.errors import describe
from pipeline.keys import DOWNLINKS, UPLINKS, WRITES, Keys
from pipeline.redact import redact_text
from pipeline.streams import Redis

_PAGE = 200


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


class DeadRow(msgspec.Struct, kw_only=True):
    """A dead letter as read back: its id in the dead stream and the decoded letter."""

    id: str
    letter: events.DeadLetter | None
    #: Why ``letter`` is ``None`` (the entry could not be decoded).
    error: str | None = None
    #: The dead stream holding it ("" = ``keys.dead``).
    dead_stream: str = ""


def decode_entry(entry_id: Any, fields: Any, dead_stream: str = "") -> DeadRow:
    eid = as_str(entry_id)
    raw = (fields or {}).get(events.FIELD)
    if raw is None:
        return DeadRow(id=eid, letter=None, error="no `d` field", dead_stream=dead_stream)
    try:
        return DeadRow(id=eid, letter=events.decode_dead(raw), dead_stream=dead_stream)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return DeadRow(id=eid, letter=None, error=f"undecodable: {exc}",
                       dead_stream=dead_stream)


def dead_id(keys: Keys, dead_stream: str, entry_id: str) -> str:
    """How a letter is named (module docstring)."""
    partition = None if dead_stream == keys.dead else keys.partition_of_stream(dead_stream)
    return entry_id if partition is None else f"{partition}/{entry_id}"


def _locate(keys: Keys, name: str) -> tuple[str, str]:
    """(dead stream, entry id) of a letter's name (:func:`dead_id`)."""
    partition, sep, entry_id = name.rpartition("/")
    if not sep or not partition.isdigit():
        return keys.dead, name
    return keys.dead_for(keys.stream(UPLINKS, int(partition))), entry_id


def _entry_id(row: DeadRow) -> str:
    return row.id.rpartition("/")[2]


def _id_order(row: DeadRow) -> tuple[int, int]:
    ms, _, seq = _entry_id(row).partition("-")
    return int(ms), int(seq or 0)


async def dead_total(redis: Redis, keys: Keys) -> int:
    """Letters in every dead stream."""
    return sum([int(await redis.xlen(key)) for key in keys.dead_streams()])


async def delete_dead(redis: Redis, keys: Keys, rows: Iterable[DeadRow]) -> int:
    """Delete these letters from their dead streams; returns how many were deleted."""
    by_stream: dict[str, list[str]] = {}
    for row in rows:
        by_stream.setdefault(row.dead_stream or keys.dead, []).append(_entry_id(row))
    return sum([int(await redis.xdel(key, *ids)) for key, ids in by_stream.items()])


def matches(row: DeadRow, reason: str | None) -> bool:
    return reason is None or (row.letter is not None and row.letter.reason == reason)


async def scan_dead(
    redis: Redis, keys: Keys, *, reason: str | None = None, limit: int | None = None
) -> list[DeadRow]:
    """Dead letters newest first (over every dead stream), optionally only one ``reason``, at
    most ``limit``."""
    streams = keys.dead_streams()
    if len(streams) == 1:
        return await _scan_one(redis, keys, streams[0], reason, limit)
    rows = [row for key in streams for row in await _scan_one(redis, keys, key, reason, limit)]
    rows.sort(key=_id_order, reverse=True)
    return rows if limit is None else rows[:limit]


async def _scan_one(redis: Redis, keys: Keys, key: str, reason: str | None,
                    limit: int | None) -> list[DeadRow]:
    out: list[DeadRow] = []
    upper = "+"
    while limit is None or len(out) < limit:
        # Unfiltered, every entry read is kept: read no more than still wanted (letters are up
        # to ~8 KiB each, and the status page wants ten on every build). Filtered, any may be.
        count = _PAGE if limit is None or reason is not None else min(_PAGE, limit - len(out))
        page = await redis.xrevrange(key, max=upper, min="-", count=count)
        if not page:
            break
        for entry_id, fields in page:
            row = decode_entry(dead_id(keys, key, as_str(entry_id)), fields, key)
            if matches(row, reason):
                out.append(row)
                if limit is not None and len(out) >= limit:
                    break
        upper = f"({as_str(page[-1][0])}"
    return out


async def get_dead(redis: Redis, keys: Keys, ids: Iterable[str]) -> dict[str, DeadRow | None]:
    """The dead letters with these names (:func:`dead_id`); ``None`` for one not found."""
    out: dict[str, DeadRow | None] = {}
    for name in ids:
        key, eid = _locate(keys, name)
        try:
            found = await redis.xrange(key, min=eid, max=eid)
        except ResponseError:
            found = []
        out[name] = decode_entry(name, found[0][1], key) if found else None
    return out


def pipeline_streams(keys: Keys) -> dict[str, str]:
    """Stream key → stream name, for every partition of the streams a letter may come from."""
    return {key: name for name in (UPLINKS, WRITES, DOWNLINKS) for key in keys.streams(name)}


def letter_summary(row: DeadRow) -> dict[str, Any]:
    if row.letter is None:
        return {"id": row.id, "error": row.error}
    d = row.letter
    return {
        "id": row.id,
        "time": _time(d.dead_ts_ms),
        "stage": d.stage,
        "reason": d.reason,
        "meaning": describe(d.reason),
        "detail": redact_text(d.detail),
        "attempts": d.attempts,
        "stream": d.stream,
        "entry_id": d.entry_id,
        **({"raw_size": d.raw_size, "raw_digest": d.raw_digest} if d.truncated else {}),
    }


async def replay(
    redis: Redis, keys: Keys, rows: Iterable[DeadRow]
) -> list[tuple[str, str, str]]:
    """Append each letter's raw entry to its origin stream, then delete the letter.

    Returns ``(dead id, stream, new entry id)`` for each replayed letter. Letters whose origin
    is not one of the pipeline's streams (ingest keeps the MQTT topic there), and letters whose
    raw entry was truncated, are skipped: the caller reports them. At-least-once: a crash
    between the two steps leaves the letter in place, to be replayed again. A replayed
    uplink carries :data:`pipeline.events.REPLAY`, so transform processes it even though its
    ``event_id`` was seen within the de-duplication window (:mod:`pipeline.dedup`).
    """
    ours = pipeline_streams(keys)
    done = []
    for row in rows:
        if row.letter is None or row.letter.stream not in ours or row.letter.truncated:
            continue
        fields = {events.FIELD: row.letter.raw}
        if ours[row.letter.stream] == UPLINKS:
            fields[events.REPLAY] = b"1"
        new_id = await redis.xadd(row.letter.stream, fields)  # type: ignore[arg-type]
        await redis.xdel(row.dead_stream or keys.dead, _entry_id(row))
        done.append((row.id, row.letter.stream, as_str(new_id)))
    return done


