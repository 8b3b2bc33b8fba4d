"""Operator commands: ``lag``, ``status``, ``dead list|show|replay|purge`` and
``devices list|show|unbreak|reindex``.

Each ``cmd_*`` takes the parsed arguments of :mod:`blynk_bridge.cli` and returns an exit code:
0 done, 1 done in part (a dead letter not found or not replayable, Redis unreachable), 2 the
request itself was wrong. Nothing asks questions, so every command scripts. Tokens are never
printed in full (:func:`pipeline.redact.mask`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from redis.exceptions import RedisError, ResponseError
from rich.console import Console
from rich.table import Table

from pipeline import blynk_index, dedup, events
from pipeline import config as config_mod
from pipeline.backlog import StreamInfo, snapshot
from pipeline.errors import describe
from pipeline.keys import DOWNLINKS, UPLINKS, WRITES, Keys
from pipeline.order import LastWritten
from pipeline.redact import mask, redact_url, safe_url
from pipeline.registry import Device, Registry
from pipeline.status import StatusBoard
from pipeline.streams import Redis, connect, now_ms

T = TypeVar("T")

#: Dict keys whose values are secrets wherever they appear in a decoded entry.
SECRET_KEYS = frozenset({"token", "t", "api_key", "access_token", "password", "secret"})

_PAGE = 200


def _console() -> Console:
    # Off a terminal (pipes, tests) rich would wrap at 80 columns and split stream names.
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def _safe_url(url: str) -> str:
    """A Redis URL without its password."""
    return safe_url(url)


@asynccontextmanager
async def _redis(cfg: config_mod.Config) -> AsyncIterator[tuple[Redis, Keys]]:
    redis = connect(cfg.redis.url)
    try:
        yield redis, Keys(cfg.redis.prefix, cfg.redis.partitions)
    finally:
        await redis.aclose()


def _run(cfg: config_mod.Config, work: Callable[[Redis, Keys], Awaitable[T]]) -> T | None:
    """Run ``work`` against the configured Redis; ``None`` (and a message) on Redis errors."""

    async def main() -> T:
        async with _redis(cfg) as (redis, keys):
            return await work(redis, keys)

    try:
        return asyncio.run(main())
    except RedisError as exc:
        print(f"Redis at {_safe_url(cfg.redis.url)}: {exc}", file=sys.stderr)
        return None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


# ---------------------------------------------------------------------------------------- lag


def lag_rows(streams: Iterable[StreamInfo], now: int) -> list[dict[str, Any]]:
    """One JSON-able row per stream, groups nested (the ``--json`` shape)."""
    return [
        {
            "stream": s.name,
            "key": s.key,
            "length": s.length,
            "groups": [
                {
                    "group": g.name,
                    "lag": g.lag,
                    "lag_exact": g.lag_exact,
                    "pending": g.pending,
                    "consumers": g.consumers,
                    "last_delivered_id": g.last_delivered_id,
                    "oldest_pending_id": g.oldest_pending_id,
                    "oldest_pending_age_s": round(g.oldest_pending_age_s(now), 3),
                }
                for g in s.groups
            ],
        }
        for s in streams
    ]


def cmd_lag(args: argparse.Namespace) -> int:
    """Every stream (each partition) and group: length, lag, pending, consumers, oldest pending."""
    streams = _run(config_mod.load(args.config), snapshot)
    if streams is None:
        return 1
    now = now_ms()
    if getattr(args, "json", False):
        print(json.dumps(lag_rows(streams, now), indent=2))
        return 0
    table = Table(title="blynk-bridge streams")
    for col in ("stream", "group", "length", "lag", "pending", "consumers", "oldest pending"):
        table.add_column(col, justify="left" if col in ("stream", "group") else "right")
    for s in streams:
        if not s.groups:
            table.add_row(s.key, "-", str(s.length), "", "", "", "")
        for g in s.groups:
            lag = str(g.lag) if g.lag_exact else f">={g.lag}"
            table.add_row(s.key, g.name, str(s.length), lag, str(g.pending), str(g.consumers),
                          _age(g.oldest_pending_age_s(now)))
    _console().print(table)
    return 0


# ------------------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    """Integration statuses and, per template, decoded keys that have no datastream."""
    cfg = config_mod.load(args.config)

    async def work(redis: Redis, keys: Keys) -> tuple[list[Any], dict[str, dict[str, int]]]:
        statuses = await StatusBoard(redis, keys).all()
        unmapped = {}
        for t in cfg.templates:
            raw = await redis.hgetall(keys.unmapped(t.name))
            unmapped[t.name] = {_s(k): int(v) for k, v in sorted(raw.items())}
        return statuses, unmapped

    result = _run(cfg, work)
    if result is None:
        return 1
    statuses, unmapped = result
    if getattr(args, "json", False):
        out = {
            "integrations": [
                {**msgspec.to_builtins(s), "last_error": redact_url(s.last_error or "") or None}
                for s in statuses
            ],
            "unmapped": unmapped,
        }
        print(json.dumps(out, indent=2))
        return 0
    console = _console()
    table = Table(title="integrations")
    for col in ("kind", "name", "state", "since", "last error", "error kind", "owner"):
        table.add_column(col)
    for s in statuses:
        table.add_row(s.kind, s.name, str(s.state), _time(s.since_ms),
                      redact_url(s.last_error or "-"), s.error_kind or "-", s.owner or "-")
    if not statuses:
        table.add_row("-", "no integration has reported yet", "", "", "", "", "")
    console.print(table)
    keys_table = Table(title="decoded keys with no datastream")
    for col in ("template", "key", "count"):
        keys_table.add_column(col, justify="right" if col == "count" else "left")
    for template, counts in unmapped.items():
        for key, count in counts.items():
            keys_table.add_row(template, key, str(count))
    if not any(unmapped.values()):
        keys_table.add_row("-", "none", "")
    console.print(keys_table)
    return 0


# --------------------------------------------------------------------------------------- dead


class DeadRow(msgspec.Struct, kw_only=True):
    """A dead letter as read back: its id in the dead stream and the decoded letter."""

    id: str
    letter: events.DeadLetter | None
    #: Why ``letter`` is ``None`` (the entry could not be decoded).
    error: str | None = None


def _decode_dead_entry(entry_id: Any, fields: Any) -> DeadRow:
    eid = _s(entry_id)
    raw = (fields or {}).get(events.FIELD)
    if raw is None:
        return DeadRow(id=eid, letter=None, error="no `d` field")
    try:
        return DeadRow(id=eid, letter=events.decode_dead(raw))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return DeadRow(id=eid, letter=None, error=f"undecodable: {exc}")


def _matches(row: DeadRow, reason: str | None) -> bool:
    return reason is None or (row.letter is not None and row.letter.reason == reason)


async def scan_dead(
    redis: Redis, keys: Keys, *, reason: str | None = None, limit: int | None = None
) -> list[DeadRow]:
    """Dead letters newest first, optionally only one ``reason``, at most ``limit``."""
    out: list[DeadRow] = []
    upper = "+"
    while limit is None or len(out) < limit:
        page = await redis.xrevrange(keys.dead, max=upper, min="-", count=_PAGE)
        if not page:
            break
        for entry_id, fields in page:
            row = _decode_dead_entry(entry_id, fields)
            if _matches(row, reason):
                out.append(row)
                if limit is not None and len(out) >= limit:
                    break
        upper = f"({_s(page[-1][0])}"
    return out


async def get_dead(redis: Redis, keys: Keys, ids: Iterable[str]) -> dict[str, DeadRow | None]:
    """The dead letters with these ids; ``None`` for an id not in the dead stream."""
    out: dict[str, DeadRow | None] = {}
    for eid in ids:
        try:
            found = await redis.xrange(keys.dead, min=eid, max=eid)
        except ResponseError:
            found = []
        out[eid] = _decode_dead_entry(*found[0]) if found else None
    return out


def pipeline_streams(keys: Keys) -> dict[str, str]:
    """Stream key → stream name, for every partition of the streams a letter may come from."""
    return {key: name for name in (UPLINKS, WRITES, DOWNLINKS) for key in keys.streams(name)}


def _mask_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (mask(str(v)) if k in SECRET_KEYS and isinstance(v, str) else _mask_secrets(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask_secrets(v) for v in value]
    return value


def decode_original(letter: events.DeadLetter, keys: Keys) -> Any:
    """The dead entry's payload as JSON-able data, secrets masked.

    Decoded as the event its origin stream carries (``Uplink``, ``BlynkWrite``, ``Downlink``);
    anything else (an MQTT payload from ingest, bytes that do not decode) falls back to generic
    msgpack or JSON, then to ``repr``.
    """
    decoders: dict[str, Callable[[bytes], Any]] = {
        UPLINKS: events.decode_uplink,
        WRITES: events.decode_write,
        DOWNLINKS: events.decode_downlink,
    }
    name = pipeline_streams(keys).get(letter.stream)
    candidates: list[Callable[[bytes], Any]] = []
    if name is not None:
        candidates.append(decoders[name])
    candidates += [msgspec.msgpack.decode, msgspec.json.decode]
    for decode in candidates:
        try:
            return _mask_secrets(msgspec.to_builtins(decode(letter.raw)))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return repr(letter.raw[:2000])


def _letter_summary(row: DeadRow) -> dict[str, Any]:
    if row.letter is None:
        return {"id": row.id, "error": row.error}
    d = row.letter
    return {
        "id": row.id,
        "time": _time(d.dead_ts_ms),
        "stage": d.stage,
        "reason": d.reason,
        "meaning": describe(d.reason),
        "detail": redact_url(d.detail),
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
    uplink's ``event_id`` is forgotten by de-duplication first (:func:`pipeline.dedup.forget`),
    or transform would drop it as already seen.
    """
    ours = pipeline_streams(keys)
    done = []
    for row in rows:
        if row.letter is None or row.letter.stream not in ours or row.letter.truncated:
            continue
        if ours[row.letter.stream] == UPLINKS:
            try:
                event_id = events.decode_uplink(row.letter.raw).event_id
            except (msgspec.DecodeError, msgspec.ValidationError):
                event_id = None  # not an uplink: transform will dead-letter it again, visibly
            if event_id is not None:
                await dedup.forget(redis, keys, [event_id])
        new_id = await redis.xadd(row.letter.stream, {events.FIELD: row.letter.raw})
        await redis.xdel(keys.dead, row.id)
        done.append((row.id, row.letter.stream, _s(new_id)))
    return done


def cmd_dead(args: argparse.Namespace) -> int:
    """``dead list|show|replay|purge`` (see the module docstring for exit codes)."""
    action: str = args.action
    ids: list[str] = list(args.ids or [])
    reason: str | None = args.reason
    every: bool = bool(getattr(args, "all", False))
    if action == "show" and not ids:
        print("dead show: give one or more dead-letter ids (see `dead list`)", file=sys.stderr)
        return 2
    if action in ("replay", "purge") and not (ids or reason or every):
        print(f"dead {action}: give ids, --reason REASON, or --all", file=sys.stderr)
        return 2
    cfg = config_mod.load(args.config)

    async def work(redis: Redis, keys: Keys) -> int:
        missing: list[str] = []
        if ids:
            found = await get_dead(redis, keys, ids)
            missing = [i for i, r in found.items() if r is None]
            rows = [r for r in found.values() if r is not None and _matches(r, reason)]
        else:
            limit = args.limit if action == "list" else None
            rows = await scan_dead(redis, keys, reason=reason, limit=limit)
        for eid in missing:
            print(f"no dead letter {eid}", file=sys.stderr)
        if action == "list":
            _print_list(rows, await redis.xlen(keys.dead), bool(getattr(args, "json", False)))
        elif action == "show":
            for row in rows:
                _print_show(row, keys)
        elif action == "replay":
            done = await replay(redis, keys, rows)
            replayed = {d for d, _, _ in done}
            for dead_id, stream, new_id in done:
                print(f"replayed {dead_id} -> {stream} as {new_id}")
            refused = [r for r in rows if r.id not in replayed]
            for r in refused:
                if r.letter is not None and r.letter.truncated:
                    why = (f"only the first {len(r.letter.raw)} of its {r.letter.raw_size} "
                           f"bytes were kept (digest {r.letter.raw_digest})")
                else:
                    origin = r.letter.stream if r.letter else "?"
                    why = (f"its origin {origin!r} is not a pipeline stream (ingest keeps the "
                           "MQTT topic or request there)")
                print(f"cannot replay {r.id}: {why}; inspect it with `dead show` and send it "
                      "again from its source", file=sys.stderr)
            print(f"replayed {len(done)} of {len(rows)} dead letters")
            if refused:
                return 1
        else:  # purge
            purged = await redis.xdel(keys.dead, *[r.id for r in rows]) if rows else 0
            print(f"purged {purged} dead letters")
        return 1 if missing else 0

    rc = _run(cfg, work)
    return 1 if rc is None else rc


def _print_list(rows: list[DeadRow], total: int, as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(_letter_summary(row)))
        return
    table = Table(title=f"dead letters ({len(rows)} shown of {total})")
    for col in ("id", "time", "stage", "reason", "attempts", "origin", "detail"):
        table.add_column(col, justify="right" if col == "attempts" else "left")
    for row in rows:
        s = _letter_summary(row)
        if row.letter is None:
            table.add_row(row.id, "", "", "undecodable", "", "", str(row.error))
            continue
        detail = s["detail"] if len(s["detail"]) <= 80 else s["detail"][:79] + "…"
        table.add_row(s["id"], s["time"], s["stage"], s["reason"], str(s["attempts"]),
                      s["stream"], detail)
    _console().print(table)


def _print_show(row: DeadRow, keys: Keys) -> None:
    out = _letter_summary(row)
    if row.letter is not None:
        out["replayable"] = row.letter.stream in pipeline_streams(keys) and not row.letter.truncated
        out["entry"] = decode_original(row.letter, keys)
    print(json.dumps(out, indent=2, default=str))


# ------------------------------------------------------------------------------------ devices


def _device_row(dev: Device, since_ms: int | None) -> dict[str, Any]:
    """A registry row as JSON-able data, the token masked."""
    return {
        "key": dev.key,
        "status": dev.status,
        "reason": dev.reason,
        "detail": dev.detail,
        "broken_since": _time(since_ms) if since_ms is not None else None,
        "template": dev.template,
        "server": dev.server,
        "blynk_id": dev.blynk_id,
        "token": mask(dev.token),
    }


async def _scan_devices(redis: Redis, keys: Keys, limit: int) -> list[str]:
    """Device keys of registry rows (``SCAN``; at most ``limit``)."""
    row_prefix = keys.device("", "", "")[: -len("::")]
    out: list[str] = []
    async for raw in redis.scan_iter(match=f"{row_prefix}*", count=1000):
        out.append(_s(raw)[len(row_prefix):])
        if len(out) >= limit:
            break
    return sorted(out)


def cmd_devices(args: argparse.Namespace) -> int:
    """``devices list|show|unbreak|reindex`` (see the module docstring for exit codes)."""
    action: str = args.action
    keys_given: list[str] = list(getattr(args, "keys", None) or [])
    every = bool(getattr(args, "all", False))
    as_json = bool(getattr(args, "json", False))
    if action == "show" and not keys_given:
        print("devices show: give one or more device keys (see `devices list`)", file=sys.stderr)
        return 2
    if action == "unbreak" and not (keys_given or every):
        print("devices unbreak: give device keys, or --all for every broken device",
              file=sys.stderr)
        return 2
    cfg = config_mod.load(args.config)

    async def work(redis: Redis, keys: Keys) -> int:
        if action == "reindex":
            written = await blynk_index.backfill(redis, keys)
            print(f"registry indexed for downlinks: {written} index entries written")
            return 0
        registry = Registry(redis, keys)
        since = dict(await registry.broken())
        if action == "list":
            wanted = (await _scan_devices(redis, keys, args.limit) if every
                      else list(since)[: args.limit])
            rows = [d for d in (await registry.load(wanted)).values() if d is not None]
            _print_devices(rows, since, as_json)
            return 0
        missing: list[str] = []
        if action == "show":
            found = await registry.load(keys_given)
            out = []
            for key in keys_given:
                dev = found.get(key)
                if dev is None:
                    missing.append(key)
                    continue
                row = _device_row(dev, since.get(key))
                row["last_written"] = await LastWritten(redis, keys, "ops").get(key)
                out.append(row)
            print(json.dumps(out, indent=2))
        else:  # unbreak
            for key in keys_given or list(since):
                if await registry.mark_ok(key, by="operator"):
                    print(f"{key}: set back to ok; its next uplink tries its token again")
                else:
                    missing.append(key)
        for key in missing:
            print(f"no device {key} in the registry", file=sys.stderr)
        return 1 if missing else 0

    rc = _run(cfg, work)
    return 1 if rc is None else rc


def _print_devices(rows: list[Device], since: dict[str, int], as_json: bool) -> None:
    if as_json:
        for dev in rows:
            print(json.dumps(_device_row(dev, since.get(dev.key))))
        return
    table = Table(title=f"devices ({len(rows)} shown, {len(since)} broken)")
    for col in ("key", "status", "since", "reason", "detail", "token"):
        table.add_column(col)
    for dev in rows:
        s = _device_row(dev, since.get(dev.key))
        table.add_row(s["key"], s["status"], s["broken_since"] or "-", s["reason"] or "-",
                      (s["detail"] or "-")[:80], s["token"])
    if not rows:
        table.add_row("-", "no broken device", "", "", "", "")
    _console().print(table)
